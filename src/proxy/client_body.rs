//! A client's request body on its way to the upstream.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{forward, BodyProgress};

/// How long the rest of a body nobody reads is read and discarded
/// (see [`ClientBody`]'s `Drop`): at most this long in all, and no longer
/// than [`DISCARD_IDLE`] between two reads. nginx's `lingering_time` and
/// `lingering_timeout`.
const DISCARD_FOR: Duration = Duration::from_secs(30);
const DISCARD_IDLE: Duration = Duration::from_secs(5);

/// The client's body, streamed to the upstream as it arrives.
///
/// Its trailers (a chunked HTTP/1.1 body's, or an HTTP/2 stream's last
/// HEADERS) lose every name sheath sets or vouches for, as the request
/// head does. It says whether reading it from the client failed: the
/// upstream then reports an error of its own (a reset HTTP/2 stream, a
/// request cut short), and the fault is the client's. It says when it
/// is over, which is when the upstream can be expected to answer. And a
/// body left unread, because the upstream answered without reading it
/// all or could not take it, is read to its end and discarded (see
/// `Drop`).
#[derive(Debug)]
pub struct ClientBody {
    /// `None` once read to its end or failed: a body still here when
    /// dropped, of a request that had one, was left unread.
    body: Option<Incoming>,
    /// Only a body still to be read can fail, end in trailers or be left
    /// unread, so a bodiless request (nearly every GET) allocates nothing.
    state: Option<Arc<BodyState>>,
}

#[derive(Debug)]
struct BodyState {
    failed: AtomicBool,
    /// Set at each frame read; the request's watch takes it (see
    /// [`BodyStatus::stalled`]).
    moved: AtomicBool,
    /// Whether the last read found nothing from the client yet: the
    /// upstream is taking the body and the client is not sending it.
    waiting: AtomicBool,
    /// Notified when the body is over: read to its end, failed, or
    /// dropped (the upstream no longer takes it).
    over: Notify,
    /// The listener's own identity header, when it names one.
    identity_header: Option<HeaderName>,
}

impl ClientBody {
    pub fn new(body: Incoming, forward: &crate::config::ForwardIdentity) -> Self {
        let state = (!body.is_end_stream()).then(|| {
            Arc::new(BodyState {
                failed: AtomicBool::new(false),
                moved: AtomicBool::new(false),
                waiting: AtomicBool::new(false),
                over: Notify::new(),
                identity_header: forward.header.clone(),
            })
        });
        ClientBody {
            body: Some(body),
            state,
        }
    }

    /// Whether the body failed, and when it is over, readable after the
    /// body has been handed to the upstream connection.
    pub fn status(&self) -> BodyStatus {
        BodyStatus(self.state.clone())
    }

    fn over(&self) {
        if let Some(state) = &self.state {
            // One waiter, the request; a permit is kept if it is not
            // waiting yet.
            state.over.notify_one();
        }
    }
}

/// See [`ClientBody::status`].
#[derive(Debug)]
pub struct BodyStatus(Option<Arc<BodyState>>);

impl BodyStatus {
    /// Did reading the client's body fail? Its failure is recorded before
    /// the error reaches the upstream connection, so this is settled by
    /// the time the upstream's error is seen.
    pub fn failed(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.failed.load(Ordering::Acquire))
    }

    /// Wait until the body is over: read to its end, failed, or dropped.
    /// At once for a request without one. For one waiter only.
    pub async fn over(&self) {
        if let Some(state) = &self.0 {
            state.over.notified().await;
        }
    }

    /// Whether the body is over at once (a request without one).
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// Which side, if either, has held the body up since the last call:
    /// `None` if a frame was read since, else the client when the upstream
    /// is waiting for its bytes, else the upstream, which is not reading.
    pub fn stalled(&self) -> Option<Stall> {
        let state = self.0.as_ref()?;
        if state.moved.swap(false, Ordering::Relaxed) {
            None
        } else if state.waiting.load(Ordering::Relaxed) {
            Some(Stall::Client)
        } else {
            Some(Stall::Upstream)
        }
    }
}

/// See [`BodyStatus::stalled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    Client,
    Upstream,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(&mut *body).poll_frame(cx);
        let state = this.state.as_deref();
        if let Some(state) = state {
            let waiting = frame.is_pending();
            state.waiting.store(waiting, Ordering::Relaxed);
            if !waiting {
                state.moved.store(true, Ordering::Relaxed);
            }
        }
        match BodyProgress::of(&frame, body) {
            BodyProgress::Going => {}
            BodyProgress::Ended => {
                this.body = None;
                this.over();
            }
            BodyProgress::Failed => {
                if let Some(state) = state {
                    state.failed.store(true, Ordering::Release);
                }
                this.body = None;
                this.over();
            }
        }
        frame.map_ok(|frame| {
            // Data frames, all but the last of a body, pass untouched.
            match frame.into_trailers() {
                Ok(mut trailers) => {
                    let custom = state.and_then(|s| s.identity_header.as_ref());
                    forward::strip_from_trailers(&mut trailers, custom);
                    Frame::trailers(trailers)
                }
                Err(data) => data,
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// A body dropped before its end (the upstream answered without reading
/// it all, or failed) is read to its end and thrown away, as nginx does,
/// so that the client, which may still be sending, gets the answer:
/// - HTTP/1: left unread, its bytes would sit in the socket's receive
///   buffer when the connection closes, and a close with unread bytes
///   sends RST, which can destroy the answer before the client has read
///   it. Read to its end, the connection even stays usable.
/// - HTTP/2: the stream would be reset with NO_ERROR once the answer is
///   sent, which RFC 9113 (§8.1) allows, and which curl 7.88 (Debian
///   12's) reports as "Stream error in the HTTP/2 framing layer" instead
///   of the answer.
impl Drop for ClientBody {
    fn drop(&mut self) {
        if self.state.is_none() {
            return;
        }
        self.over();
        let (Some(body), Ok(runtime)) = (self.body.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(discard(body));
    }
}

/// Read `body` to its end, for as long as [`DISCARD_FOR`] allows.
async fn discard(mut body: Incoming) {
    let give_up = Instant::now() + DISCARD_FOR;
    loop {
        let deadline = give_up.min(Instant::now() + DISCARD_IDLE);
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            // The end, the client's failure, or time up: an unread rest
            // closes the connection, as before.
            _ => return,
        }
    }
}
