//! Keeps the (target, message) of every `tracing` event and the (name, fields) of every span
//! that a test's own thread emits, for the tests that check what the client reports. Such
//! tests run on a current-thread runtime, so the client's tasks emit on the test's thread.
//!
//! One global subscriber serves every test and hands each event to the sink of the thread
//! that emits it. (A scoped subscriber per test, `tracing::subscriber::set_default`, loses
//! events: a callsite first hit on another test's thread can be cached as uninteresting.)

use std::cell::RefCell;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// (target, message) of each event.
pub type Events = Arc<Mutex<Vec<(String, String)>>>;
/// (name, `field=value` pairs) of each span.
pub type Spans = Arc<Mutex<Vec<(String, Vec<String>)>>>;

thread_local! {
    static SINK: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// What this thread emitted since [`capture`]; capturing stops when it is dropped.
#[derive(Clone, Default)]
pub struct Captured {
    pub events: Events,
    pub spans: Spans,
}

/// Starts capturing what this thread emits.
pub fn capture() -> Guard {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Global::default())
            .expect("no other global subscriber in the tests");
    });
    let captured = Captured::default();
    SINK.with(|sink| *sink.borrow_mut() = Some(captured.clone()));
    Guard(captured)
}

/// Stops capturing when dropped; derefs to what was captured.
pub struct Guard(Captured);

impl std::ops::Deref for Guard {
    type Target = Captured;
    fn deref(&self) -> &Captured {
        &self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        SINK.with(|sink| *sink.borrow_mut() = None);
    }
}

#[derive(Default)]
struct Global {
    next_span: AtomicU64,
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

impl Subscriber for Global {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        SINK.with(|sink| {
            if let Some(captured) = &*sink.borrow() {
                let mut fields = Fields(Vec::new());
                attributes.record(&mut fields);
                let name = attributes.metadata().name().to_owned();
                captured.spans.lock().unwrap().push((name, fields.0));
            }
        });
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        SINK.with(|sink| {
            if let Some(captured) = &*sink.borrow() {
                let mut message = Message(String::new());
                event.record(&mut message);
                let target = event.metadata().target().to_owned();
                captured.events.lock().unwrap().push((target, message.0));
            }
        });
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}
