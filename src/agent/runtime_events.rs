//! Follows the runtime's container events, so that a supervisor looks at its pod when a
//! container changed rather than polling Podman for every pod every second (the
//! kubelet's evented PLEG). A periodic resync in each supervisor stays the safety net.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::{ContainerEvent, Runtime};

/// What the agent hears from the follower.
#[derive(Debug)]
pub enum Signal {
    /// A container of this pod copy changed state.
    Changed(ContainerEvent),
    /// The stream was (re)opened after a gap in which events may have been missed:
    /// every supervisor should look.
    Resubscribed,
}

/// Wait before subscribing again after the stream ended or could not be opened.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// Signals buffered for the agent loop; past this, events are dropped (the
/// supervisors' resync catches up).
const SIGNAL_BUFFER: usize = 1024;

/// Subscribes to the container events of `agent`'s containers until `cancel`.
pub fn follow(
    runtime: Arc<dyn Runtime>,
    agent: String,
    cancel: CancellationToken,
) -> mpsc::Receiver<Signal> {
    let (signals, received) = mpsc::channel(SIGNAL_BUFFER);
    tokio::spawn(async move {
        let mut first = true;
        loop {
            match runtime.container_events(&agent).await {
                Ok(mut events) => {
                    if !std::mem::take(&mut first)
                        && signals.send(Signal::Resubscribed).await.is_err()
                    {
                        return;
                    }
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            event = events.recv() => match event {
                                Some(event) => {
                                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                                        signals.try_send(Signal::Changed(event))
                                    {
                                        return;
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    tracing::debug!("runtime event stream ended; subscribing again");
                }
                Err(e) => tracing::debug!(error = %e, "cannot follow runtime events; trying again"),
            }
            first = false;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
    });
    received
}
