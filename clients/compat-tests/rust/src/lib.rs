//! Nothing here: the tests drive the published crate (see tests/).
