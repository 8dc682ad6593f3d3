//! The only place that writes to the socket: it drains the connection's
//! outbound channel, writes every message that is ready and flushes once (one
//! send(2) for many replies), sends the heartbeat pings, and closes the
//! connection with the first reason given.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;

use super::state::{outbound_len, ConnState};
use crate::app::App;
use crate::task::Outbound;

/// Most messages the writer gathers before a flush.
const MAX_BATCH: usize = 64;

pub(super) async fn writer(
    app: Arc<App>,
    conn: Arc<ConnState>,
    mut sink: SplitSink<WebSocket, Message>,
) {
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + app.cfg.ping_interval,
        app.cfg.ping_interval,
    );
    let timeout = app.cfg.write_timeout;
    loop {
        let first = tokio::select! {
            biased;
            m = conn.tx.pop() => match m {
                Some(m) => m,
                None => break,
            },
            _ = conn.closing.cancelled() => {
                // Flush what is already queued (the answers of a shutdown), then close.
                while let Some(m) = conn.tx.try_pop() {
                    release(&conn, std::slice::from_ref(&m));
                    if let Some(msg) = render(&conn, m) {
                        if tokio::time::timeout(timeout, sink.feed(msg)).await.is_err() {
                            return;
                        }
                    }
                }
                send_close(&conn, &mut sink, timeout).await;
                return;
            }
            _ = ping.tick() => {
                if conn.missed_pongs.fetch_add(1, Ordering::Relaxed) >= 2 {
                    conn.close_with(close_code::AWAY, "heartbeat timeout");
                    continue;
                }
                // A full write buffer fails the ping at once (it holds the
                // pongs of a client that does not read): a slow consumer too.
                let sent = tokio::time::timeout(timeout, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn.close_with(close_code::POLICY, "slow consumer");
                }
                continue;
            }
        };
        // Write everything that is ready, then flush once: one send(2) for many
        // replies, and one deadline for the whole batch rather than a timer each.
        let batch = async {
            let mut ready = Vec::with_capacity(MAX_BATCH);
            ready.push(first);
            conn.tx.drain_into(&mut ready, MAX_BATCH - 1);
            // Out of the queue, out of the budgets: once per batch, not per
            // message (the server-wide count is shared by every connection).
            release(&conn, &ready);
            for m in ready {
                if let Some(msg) = render(&conn, m) {
                    sink.feed(msg).await?;
                }
            }
            conn.drained.notify_waiters();
            sink.flush().await
        };
        // Boxed, once per batch of writes: its timer and feeds, inlined, would
        // sit in every idle connection's writer future.
        match Box::pin(tokio::time::timeout(timeout, batch)).await {
            Ok(Ok(())) => {}
            // The peer is gone (nobody reads the close), or the write buffer
            // is full of what the client did not read: a slow consumer.
            Ok(Err(_)) | Err(_) => {
                conn.close_with(close_code::POLICY, "slow consumer");
                send_close(&conn, &mut sink, timeout).await;
                return;
            }
        }
    }
    conn.closing.cancel();
}

/// Sends the close frame with the first reason given (bounded by the write
/// timeout: a client that reads nothing does not hold the connection open).
async fn send_close(conn: &ConnState, sink: &mut SplitSink<WebSocket, Message>, timeout: Duration) {
    conn.closing.cancel();
    let reason = *crate::sync::lock(&conn.close_reason);
    let (code, reason) = reason.unwrap_or((close_code::AWAY, "closing"));
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(timeout, sink.send(Message::Close(Some(frame)))).await;
}

/// Takes messages the writer has drained out of the outbound budgets.
fn release(conn: &ConnState, taken: &[Outbound]) {
    let n: usize = taken.iter().map(outbound_len).sum();
    if n > 0 {
        conn.queued_bytes.fetch_sub(n, Ordering::AcqRel);
        conn.give_total(n);
    }
}

fn render(conn: &ConnState, m: Outbound) -> Option<Message> {
    let text = match m {
        Outbound::Text(t) => t,
        // A progress value larger than the whole budget is dropped: no single
        // message may outgrow the WebSocket's capped write buffer.
        Outbound::Progress(task) => task
            .take_progress_text()
            .filter(|t| t.len() <= conn.outbound_bytes)?,
    };
    conn.bytes_out
        .fetch_add(text.len() as u64, Ordering::Relaxed);
    conn.messages_out.fetch_add(1, Ordering::Relaxed);
    Some(Message::Text(text.into()))
}
