//! A sink for an observer, who only looks: its stream comes from a disposable slot, so
//! each transaction is confirmed as soon as it is handed on, and whatever the observer
//! sends is ignored (it cannot move or hold back anything).

use tokio::sync::mpsc;

use super::sink::{Link, Sink};

/// Wraps a sink (a websocket) so that it confirms what it is given.
pub(crate) struct Observer<S>(pub S);

impl<S: Sink> Sink for Observer<S> {
    async fn run(self, link: Link) {
        let Link { slot, start, mut messages, acks, progress, stop } = link;
        let (messages_tx, messages_rx) = mpsc::channel(1);
        let (ignored_tx, mut ignored_rx) = mpsc::channel(16);
        let inner = Link { slot, start, messages: messages_rx, acks: ignored_tx, progress, stop: stop.clone() };
        let forward = async move {
            loop {
                tokio::select! {
                    _ = stop.stopped() => break,
                    item = messages.recv() => {
                        let Some(item) = item else { break };
                        let confirm = item.last_ack_point();
                        if messages_tx.send(item).await.is_err() {
                            break;
                        }
                        if let Some(lsn) = confirm {
                            if acks.send(lsn).await.is_err() {
                                break;
                            }
                        }
                    }
                    // The observer's acks, if it sends any, go nowhere.
                    Some(_) = ignored_rx.recv() => {}
                }
            }
        };
        tokio::join!(forward, self.0.run(inner));
    }
}
