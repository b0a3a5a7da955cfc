//! A minimal `tracing` subscriber that keeps the (target, message) of every event and the
//! (name, fields) of every span, for the tests that check what the client reports.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// (target, message) of each event.
pub type Events = Arc<Mutex<Vec<(String, String)>>>;
/// (name, `field=value` pairs) of each span.
pub type Spans = Arc<Mutex<Vec<(String, Vec<String>)>>>;

pub struct Capture {
    events: Events,
    spans: Spans,
    next_span: AtomicU64,
}

impl Capture {
    pub fn new(events: Events) -> Self {
        Self::with_spans(events, Spans::default())
    }

    pub fn with_spans(events: Events, spans: Spans) -> Self {
        Self {
            events,
            spans,
            next_span: AtomicU64::new(1),
        }
    }
}

/// The `message` of an event.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// Every field of a span, as `name=value`.
struct Fields(Vec<String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.push(format!("{}={value:?}", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut fields = Fields(Vec::new());
        attributes.record(&mut fields);
        let name = attributes.metadata().name().to_owned();
        self.spans.lock().unwrap().push((name, fields.0));
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        let target = event.metadata().target().to_owned();
        self.events.lock().unwrap().push((target, message.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}
