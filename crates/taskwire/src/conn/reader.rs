//! The reader: reads frames, counts them against the connection's rate limits,
//! parses, and hands each request to admission. It never awaits a task, so the
//! connection keeps being served while tasks run. It alone owns the request
//! rate limit, the ping rate limit and the shutdown flag.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, Message, WebSocket};
use futures_util::stream::SplitStream;
use futures_util::StreamExt;

use super::admit::{self, Admission, Place};
use super::reply::{self, Batch, Dest};
use super::state::ConnState;
use super::STOP_GRACE;
use crate::app::App;
use crate::config::RateLimit;
use crate::limit::TokenBucket;
use crate::observe::RefusalReason;
use crate::protocol::{self, ErrorObject, Frame, Rejected, Request};
use crate::task::Stopped;

pub(super) struct Reader<'a> {
    app: &'a Arc<App>,
    conn: &'a Arc<ConnState>,
    /// The request rate limit (the server's, or the presented token's).
    requests: Option<TokenBucket>,
    /// Every Ping makes the WebSocket layer queue a Pong: pings beyond this
    /// rate are a flood no error can answer.
    pings: TokenBucket,
    /// The server is shutting down: new tasks are refused `-32005`.
    shutting_down: bool,
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        app: &'a Arc<App>,
        conn: &'a Arc<ConnState>,
        rate: Option<RateLimit>,
    ) -> Reader<'a> {
        let now = Instant::now();
        Reader {
            app,
            conn,
            requests: rate.map(|r| TokenBucket::new(r.per_second, r.burst, now)),
            pings: {
                let p = app.cfg.ping_rate();
                TokenBucket::new(p.per_second, p.burst, now)
            },
            shutting_down: false,
        }
    }

    /// Reads until the connection ends, the server asks it to close, or the
    /// shutdown grace period is over.
    pub(super) async fn run(mut self, stream: &mut SplitStream<WebSocket>) {
        let (app, conn) = (self.app, self.conn);
        let shutdown = app.shutdown.clone();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let msg = tokio::select! {
                biased;
                _ = conn.closing.cancelled() => return,
                _ = shutdown.cancelled(), if grace.is_none() => {
                    self.shutting_down = true;
                    grace = Some(tokio::time::Instant::now() + app.cfg.shutdown_grace);
                    continue;
                }
                // Shutting down: leave as soon as nothing is in flight, or when
                // the grace period ends.
                _ = async {
                    match grace {
                        Some(g) => {
                            let _ = tokio::time::timeout_at(g, conn.all_answered()).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    shutdown_connection(conn).await;
                    return;
                }
                m = stream.next() => m,
            };
            let msg = match msg {
                None => return,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    if let Some((code, reason)) = close_for(e) {
                        conn.close_with(code, reason);
                    }
                    return;
                }
            };
            match msg {
                Message::Text(text) => {
                    conn.missed_pongs.store(0, Ordering::Relaxed);
                    conn.bytes_in
                        .fetch_add(text.len() as u64, Ordering::Relaxed);
                    conn.messages_in.fetch_add(1, Ordering::Relaxed);
                    // Boxed: handling a frame awaits deep paths (admission, an
                    // in-place answer, a slow consumer's wait) whose state,
                    // inlined, would make every idle connection's reader
                    // future larger by it. One allocation per frame is noise
                    // against parsing and answering it.
                    Box::pin(self.handle_text(text.as_str())).await;
                }
                Message::Binary(b) => {
                    conn.bytes_in.fetch_add(b.len() as u64, Ordering::Relaxed);
                    let err = match self.take_rate_token() {
                        Ok(()) => ErrorObject::invalid_request("binary frames are not supported"),
                        Err(wait) => self.rate_limited(wait),
                    };
                    conn.send(protocol::error_text(None, &err)).await;
                }
                Message::Ping(_) => {
                    if self.pings.take(Instant::now()).is_err() {
                        conn.close_with(close_code::POLICY, "ping rate limit");
                        return;
                    }
                }
                Message::Pong(_) => conn.missed_pongs.store(0, Ordering::Relaxed),
                Message::Close(frame) => {
                    // Only a client's own normal close ends its session;
                    // every other end detaches it.
                    if frame.is_some_and(|f| f.code == close_code::NORMAL) {
                        conn.closed_normally.store(true, Ordering::Release);
                    }
                    return;
                }
            }
        }
    }

    /// One request's worth of the rate limit, or how long until there is one.
    fn take_rate_token(&mut self) -> Result<(), Duration> {
        match self.requests.as_mut() {
            Some(b) => b.take(Instant::now()),
            None => Ok(()),
        }
    }

    /// Takes the rate limit's tokens for the elements that `need` one: `None`
    /// when there is no limit, else for each element whether its token was
    /// there (or how long until one is).
    fn take_rate(&mut self, need: &[bool]) -> Option<Vec<Result<(), Duration>>> {
        let bucket = self.requests.as_mut()?;
        let now = Instant::now();
        Some(
            need.iter()
                .map(|&n| if n { bucket.take(now) } else { Ok(()) })
                .collect(),
        )
    }

    /// The answer to a frame refused by the rate limit.
    fn rate_limited(&self, wait: Duration) -> ErrorObject {
        self.app.hooks.refused(RefusalReason::RateLimited);
        let retry = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        ErrorObject::overloaded(RefusalReason::RateLimited.label(), retry)
    }

    async fn handle_text(&mut self, text: &str) {
        let conn = self.conn;
        // The rate limit counts every element and every frame, invalid ones
        // included, before anything is answered: what a client can make the
        // server parse, check and answer is bounded by the rate, not by its input.
        match protocol::parse_frame_limited(text, self.app.cfg.max_batch) {
            Frame::Invalid(err) => {
                let err = match self.take_rate_token() {
                    Ok(()) => err,
                    Err(wait) => self.rate_limited(wait),
                };
                conn.send(protocol::error_text(None, &err)).await
            }
            Frame::Single(r) => {
                if !rate_exempt(&r) {
                    if let Err(wait) = self.take_rate_token() {
                        let err = self.rate_limited(wait);
                        let (id, silent) = match &r {
                            Ok(req) => (req.id.as_ref(), req.id.is_none()),
                            Err(rej) => (rej.id.as_ref(), rej.notification),
                        };
                        if !silent {
                            conn.send(protocol::error_text(id, &err)).await;
                        }
                        return;
                    }
                }
                let place = if conn.messages_in.load(Ordering::Relaxed) == 1 {
                    Place::First
                } else {
                    Place::Single
                };
                self.dispatch(r, Dest::Direct, place).await
            }
            Frame::Batch(items) => {
                let need: Vec<bool> = items.iter().map(|r| !rate_exempt(r)).collect();
                let taken = self.take_rate(&need);
                if let Some(taken) = &taken {
                    // A batch that finds the bucket empty gets one error, not one
                    // per element: a flood of batches is answered frame for frame.
                    let refused_all = need.iter().any(|&n| n)
                        && need.iter().zip(taken).all(|(&n, t)| !n || t.is_err());
                    if refused_all {
                        let wait = taken
                            .iter()
                            .find_map(|t| t.err())
                            .unwrap_or(Duration::from_millis(1));
                        let err = self.rate_limited(wait);
                        conn.send(protocol::error_text(None, &err)).await;
                        return;
                    }
                }
                let batch = Batch::new(items.len());
                for (i, r) in items.into_iter().enumerate() {
                    let dest = Dest::Batch(batch.clone(), i);
                    match taken.as_ref().and_then(|t| t.get(i)) {
                        Some(Err(wait)) => {
                            let err = self.rate_limited(*wait);
                            let (id, silent) = match &r {
                                Ok(req) => (req.id.clone(), req.id.is_none()),
                                Err(rej) => (rej.id.clone(), rej.notification),
                            };
                            let text = (!silent).then(|| protocol::error_text(id.as_ref(), &err));
                            dest.deliver(conn, text, id.as_ref()).await;
                        }
                        _ => self.dispatch(r, dest, Place::InBatch).await,
                    }
                }
            }
        }
    }

    /// Admits one request and either answers it or starts its task: the one
    /// place where a request leaves the reader.
    async fn dispatch(&self, r: Result<Request<'_>, Rejected>, dest: Dest, place: Place) {
        match admit::admit(self.app, self.conn, r, self.shutting_down, place) {
            Admission::Answer { text, id } => dest.deliver(self.conn, text, id.as_ref()).await,
            Admission::Task { task, fut, permit } => {
                reply::start(self.app, self.conn, task, fut, permit, dest).await
            }
        }
    }
}

/// Answers what is still running with -32005 and closes with 1001.
async fn shutdown_connection(conn: &Arc<ConnState>) {
    conn.stop_all(Stopped::Shutdown);
    let _ =
        tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), conn.all_answered()).await;
    conn.close_with(close_code::AWAY, "server shutting down");
}

/// The close code for what the WebSocket layer refused to read; `None` when
/// the peer is gone and there is nobody to tell.
fn close_for(e: axum::Error) -> Option<(u16, &'static str)> {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some((close_code::SIZE, "message too big")),
        tungstenite::Error::Utf8(_) => Some((close_code::INVALID, "text frame is not UTF-8")),
        tungstenite::Error::Protocol(_) => Some((close_code::PROTOCOL, "protocol violation")),
        _ => None,
    }
}

/// A cancel or a session's acknowledgement only ever frees resources: the
/// rate limit does not count it (a throttled client must still be able to
/// free its session's buffer).
fn rate_exempt(r: &Result<Request<'_>, Rejected>) -> bool {
    matches!(r, Ok(req) if req.method == protocol::CANCEL_METHOD
        || (req.method == crate::session::frames::ACK_METHOD && req.id.is_none()))
}
