//! Events are published off the reconcile path: a bounded queue drained by one task.
//!
//! Why: an Event is informational, but it is a write to the API server. Publishing inline
//! would make every reconcile wait for it and, at scale (thousands of connections created at
//! once), compete with the writes that matter (Secrets, status). Like client-go's event
//! broadcaster, the queue is bounded and drops (and counts) events when full, so a burst can
//! never grow memory or delay convergence.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

pub const QUEUE_CAPACITY: usize = 1024;

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    dropped: Counter,
}

impl EventSink {
    /// Start the publishing task on the current runtime.
    pub fn start(recorder: Recorder, dropped: Counter) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            while let Some((ev, reference)) = rx.recv().await {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::debug!(error = %e, "could not publish event");
                }
            }
        });
        EventSink { tx, dropped }
    }

    pub fn publish(
        &self,
        reference: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if self.tx.try_send((ev, reference)).is_err() {
            self.dropped.inc();
        }
    }
}
