//! The listener and its connections: accept, cap, time out, serve.
//!
//! [`Server`] runs its own accept loop over hyper's HTTP/1.1 connection
//! driver rather than `axum::serve`, because the bounds a public cache
//! needs are about connections, which `axum::serve` does not expose:
//! - a cap on open connections ([`conns`]), which makes room by closing
//!   the connection that has waited longest for a request head (else the
//!   longest idle), so clients that trickle bytes or hold idle sockets
//!   cannot lock out a well-behaved one;
//! - separate header and idle timeouts, enforced by one sweep over the
//!   registry. hyper's own `header_read_timeout` starts as soon as a
//!   keep-alive connection waits for its next request, so it would also
//!   close idle connections after the (shorter) header timeout;
//! - request heads of at most [`MAX_HEAD_BYTES`], refused with a JSON 431
//!   as their bytes arrive (hyper's own refusal past its read buffer has
//!   no body to tell the client why);
//! - an accept loop that never stops or sleeps when descriptors run out:
//!   it keeps one descriptor in reserve, and on `EMFILE` gives it up to
//!   accept, makes room or closes the newcomer, and takes it back.
//!
//! Writes that stall are cut off by [`stall::StallGuard`]. With
//! [`tls::Tls`], each connection first completes a TLS handshake (within
//! the header timeout) and is then served by HTTP/2 or HTTP/1.1, as ALPN
//! chose.

pub mod conns;
pub mod stall;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

pub use conns::{CloseReason, ConnLimits, ConnStats, Connections};
use conns::{Conn, RequestGuard};
use stall::StallGuard;
use tls::{ClientName, Tls};

/// Streams one HTTP/2 connection may have open at once.
pub const MAX_H2_STREAMS: u32 = 128;

/// Largest request head (request line and headers), in bytes: 431 beyond.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Descriptors kept back from client connections for data files, the
/// cluster pool, origin fetches and the accept loop's reserve.
pub const FD_RESERVE: u64 = 128;

/// Raises the soft open-file limit to the hard one and returns the soft
/// limit now in force (`None` where the platform has none to read).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct
        // passed by pointer, which lives on this stack frame.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap to use: `wanted`, lowered to what `fd_limit` allows
/// once `reserve` descriptors are kept back.
pub fn fd_budget(wanted: usize, fd_limit: Option<u64>, reserve: u64) -> usize {
    let allowed = fd_limit.map_or(usize::MAX, |l| {
        usize::try_from(l.saturating_sub(reserve)).unwrap_or(usize::MAX)
    });
    wanted.min(allowed).max(1)
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    conns: Arc<Connections>,
    write_stall: Duration,
    /// Whether each request carries its client's address ([`PeerAddr`]),
    /// which costs an allocation per request: only for rate limits.
    tag_peers: bool,
    /// HTTPS: every connection handshakes first.
    tls: Option<Arc<Tls>>,
    /// A descriptor held back so that `EMFILE` never leaves the accept
    /// loop without a way to accept (and then close or serve) a client.
    reserve: Option<std::fs::File>,
}

impl Server {
    /// Serves `listener` under `conns`' limits; writes that stall for
    /// `write_stall` fail.
    pub fn new(listener: TcpListener, conns: Arc<Connections>, write_stall: Duration) -> Self {
        Server {
            listener,
            conns,
            write_stall: write_stall.max(Duration::from_millis(1)),
            tag_peers: false,
            tls: None,
            reserve: open_reserve(),
        }
    }

    /// The same server, speaking HTTPS with `tls`.
    pub fn with_tls(self, tls: Arc<Tls>) -> Self {
        Server {
            tls: Some(tls),
            ..self
        }
    }

    /// The same server, giving every request its client's address as a
    /// [`PeerAddr`] extension.
    pub fn tagging_peers(self) -> Self {
        Server {
            tag_peers: true,
            ..self
        }
    }

    /// The address bound.
    ///
    /// # Errors
    /// The OS error if the socket has no local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The connection registry (for metrics).
    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    /// Serves every connection with `service` until `shutdown` completes;
    /// then stops accepting, lets each connection finish the requests it
    /// has (idle ones close at once), and returns when all have closed.
    pub async fn serve<S>(mut self, service: S, shutdown: impl Future<Output = ()>)
    where
        S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + Unpin + 'static,
    {
        let tracker = TaskTracker::new();
        let stopping = CancellationToken::new();
        let sweeper = tokio::spawn(sweep(self.conns.clone(), stopping.clone()));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer, &service, &tracker, &stopping),
                Err(e) if out_of_descriptors(&e) => {
                    if let Some((stream, peer)) = self.accept_without_descriptors() {
                        self.admit(stream, peer, &service, &tracker, &stopping);
                    }
                    // Let the tasks of closed connections run and give
                    // their descriptors back before the next accept.
                    tokio::task::yield_now().await;
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Not about descriptors (ENOBUFS, ENOMEM): let other
                    // tasks free what they hold before trying again.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        drop(self.listener);
        stopping.cancel();
        tracker.close();
        tracker.wait().await;
        sweeper.abort();
    }

    /// Starts serving a new connection, or closes it when the cap is
    /// reached and nothing can make room.
    fn admit<S>(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        service: &S,
        tracker: &TaskTracker,
        stopping: &CancellationToken,
    ) where
        S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + Unpin + 'static,
    {
        let Some(handle) = self.conns.register() else {
            drop(stream);
            return;
        };
        // Answers are small and sent whole: do not hold them back.
        let _ = stream.set_nodelay(true);
        let conn = handle.conn().clone();
        let stream = StallGuard::new(stream, self.write_stall);
        let svc = ConnService {
            inner: service.clone(),
            conn: conn.clone(),
            peer: self.tag_peers.then_some(PeerAddr(peer.ip())),
            client: None,
        };
        let stopping = stopping.clone();
        let tls = self.tls.clone();
        tracker.spawn(async move {
            let _handle = handle;
            let Some(tls) = tls else {
                return serve(stream, svc, &conn, &stopping, false).await;
            };
            // The connection waits for its first head from its accept, so
            // the header timeout bounds the handshake too.
            let handshake = tls.acceptor().accept(stream);
            let stream = tokio::select! {
                done = handshake => match done {
                    Ok(stream) => stream,
                    Err(e) => {
                        if !tls::is_handshake_refusal(&e) {
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        return;
                    }
                },
                () = conn.closed() => return,
                () = stopping.cancelled() => return,
            };
            let (h2, client) = {
                let (_, session) = stream.get_ref();
                let h2 = session.alpn_protocol() == Some(b"h2");
                let client = tls.mutual().then(|| {
                    session
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map_or(ClientName(None), |leaf| ClientName::of(leaf))
                });
                (h2, client)
            };
            let svc = ConnService { client, ..svc };
            serve(stream, svc, &conn, &stopping, h2).await;
        });
    }

    /// `EMFILE`: gives up the reserve descriptor to accept one client and
    /// closes a waiting or idle connection to make room for it, returning
    /// the client to serve; when every connection is busy the client is
    /// closed at once. The reserve is taken back when a descriptor is free.
    fn accept_without_descriptors(&mut self) -> Option<(TcpStream, SocketAddr)> {
        drop(self.reserve.take());
        let accepted = accept_now(&self.listener).ok();
        let made_room = accepted.is_some() && self.conns.make_room();
        self.reserve = open_reserve();
        if accepted.is_some() && !made_room {
            tracing::warn!("out of file descriptors and every connection is busy");
        }
        accepted.filter(|_| made_room)
    }
}

/// Accepts a connection that is already waiting, without waiting.
fn accept_now(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    match listener.poll_accept(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Runs one connection's driver until it ends, the registry closes the
/// connection, or the server stops (then the requests in hand finish).
async fn drive<F: Future>(
    mut served: Pin<&mut F>,
    graceful_shutdown: impl FnOnce(Pin<&mut F>),
    conn: &Conn,
    stopping: &CancellationToken,
) {
    tokio::select! {
        _ = served.as_mut() => {}
        () = conn.closed() => {}
        () = stopping.cancelled() => {
            graceful_shutdown(served.as_mut());
            tokio::select! {
                _ = served.as_mut() => {}
                () = conn.closed() => {}
            }
        }
    }
}

/// Serves HTTP/2 (`h2`) or HTTP/1.1 on `stream` until the client or the
/// server ends it. HTTP/1 heads are bounded by `Observed`; HTTP/2 header
/// blocks by HTTP/2's own limit, set to [`MAX_HEAD_BYTES`], and streams by
/// [`MAX_H2_STREAMS`].
async fn serve<I, S>(
    stream: I,
    svc: ConnService<S>,
    conn: &Arc<Conn>,
    stopping: &CancellationToken,
    h2: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    let io = TokioIo::new(Observed {
        inner: stream,
        conn: conn.clone(),
        // HTTP/2 frames are not lines: no head scan.
        head: (!h2).then(HeadScan::default),
        refusing: None,
    });
    if h2 {
        let mut builder =
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_concurrent_streams(MAX_H2_STREAMS);
        let served = builder.serve_connection(io, svc);
        tokio::pin!(served);
        drive(served, |c| c.graceful_shutdown(), conn, stopping).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's buffer only needs room for the longest head plus what
        // follows it in one read.
        builder.max_buf_size(2 * MAX_HEAD_BYTES);
        let served = builder.serve_connection(io, svc);
        tokio::pin!(served);
        drive(served, |c| c.graceful_shutdown(), conn, stopping).await;
    }
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Runs [`Connections::sweep`] until `stopping`.
async fn sweep(conns: Arc<Connections>, stopping: CancellationToken) {
    let mut tick = tokio::time::interval(conns.sweep_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = tick.tick() => {
                conns.sweep();
            }
        }
    }
}

/// `EMFILE` or `ENFILE`.
fn out_of_descriptors(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Errors about one connection that went away before it was accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The answer to a request head over [`MAX_HEAD_BYTES`], written by the
/// connection itself since no request was ever made of it.
const HEAD_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-type: application/json\r\nconnection: close\r\ncontent-length: 87\r\n\r\n\
{\"error\":{\"code\":\"headers_too_large\",\"message\":\"the request head exceeds 65536 bytes\"}}";

/// Finds where each request head ends as its bytes arrive, so that one
/// longer than [`MAX_HEAD_BYTES`] can be refused with a JSON 431 (hyper's
/// own refusal past its buffer has no body).
#[derive(Debug, Default)]
struct HeadScan {
    /// The request the scan is about ([`Conn::requests_started`] when it
    /// began).
    request: u64,
    /// Bytes of the head seen so far.
    seen: usize,
    /// The previous byte that was not `\r` was a line feed.
    after_newline: bool,
    /// The head's end was seen: later bytes belong to a body or to a
    /// pipelined request (hyper bounds those by its own buffer).
    ended: bool,
}

impl HeadScan {
    /// Takes `fresh` bytes read while request `request` is the next to
    /// start; true when they carry the head past the limit.
    fn over_limit(&mut self, fresh: &[u8], request: u64) -> bool {
        if request != self.request {
            *self = HeadScan {
                request,
                ..HeadScan::default()
            };
        }
        if self.ended {
            return false;
        }
        for &b in fresh {
            self.seen += 1;
            match b {
                b'\n' if self.after_newline && self.seen > 2 => {
                    self.ended = true;
                    return false;
                }
                b'\n' => self.after_newline = true,
                b'\r' => {}
                _ => self.after_newline = false,
            }
            if self.seen > MAX_HEAD_BYTES {
                return true;
            }
        }
        false
    }
}

/// A connection's stream, telling the registry when bytes arrive and
/// refusing HTTP/1 request heads over [`MAX_HEAD_BYTES`].
struct Observed<S> {
    inner: S,
    conn: Arc<Conn>,
    /// The HTTP/1 head scan (`None` for HTTP/2, whose frames are not
    /// lines).
    head: Option<HeadScan>,
    /// Bytes of [`HEAD_TOO_LARGE`] written, once a head went over.
    refusing: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Observed<S> {
    /// Writes the 431 answer, ends the write side, then tells hyper the
    /// stream ended (so it closes the connection).
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let written = self.refusing.get_or_insert(0);
        while *written < HEAD_TOO_LARGE.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &HEAD_TOO_LARGE[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Observed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refusing.is_some() {
            return self.poll_refuse(cx);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
            // Bytes read while a request is served are its body (or a
            // pipelined head, which hyper's buffer bounds).
            let request = self.conn.requests_started();
            let this = &mut *self;
            let over = match &mut this.head {
                Some(scan) if this.conn.waiting_for_head() => {
                    scan.over_limit(&buf.filled()[before..], request)
                }
                _ => false,
            };
            if over {
                // hyper never sees these bytes: the stream ends for it
                // once the answer is out.
                buf.set_filled(before);
                this.conn.note_head_too_large();
                return this.poll_refuse(cx);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Observed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service hyper calls for each request of one connection: the
/// server's service, with the connection busy until the response is sent.
struct ConnService<S> {
    inner: S,
    conn: Arc<Conn>,
    peer: Option<PeerAddr>,
    /// The client certificate's name, under mutual TLS.
    client: Option<ClientName>,
}

/// The address of the client that sent a request, when the server tags
/// requests with it ([`Server::tagging_peers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::IpAddr);

impl<S> hyper::service::Service<hyper::Request<Incoming>> for ConnService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = hyper::Response<Guarded<Option<RequestGuard>>>;
    type Error = Infallible;
    type Future = ConnAnswer<S::Future>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.conn.request_started();
        let mut req = req.map(Body::new);
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(peer);
        }
        if let Some(client) = &self.client {
            req.extensions_mut().insert(client.clone());
        }
        ConnAnswer {
            served: self.inner.clone().call(req),
            guard: Some(guard),
        }
    }
}

/// A request's answer on its way from the server's service: the service's
/// own future, and the connection's busy mark, which moves into the
/// answer's body. A named type rather than a boxed one: it saves an
/// allocation per request.
pub struct ConnAnswer<F> {
    served: F,
    guard: Option<RequestGuard>,
}

impl<F> Future for ConnAnswer<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<hyper::Response<Guarded<Option<RequestGuard>>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = match Pin::new(&mut self.served).poll(cx) {
            Poll::Ready(Ok(resp)) => resp,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return Poll::Pending,
        };
        let guard = self.guard.take();
        Poll::Ready(Ok(resp.map(|body| Guarded::new(body, guard))))
    }
}

/// A response body holding `G` until it is dropped (sent whole, or its
/// connection closed): the connection's busy mark, a slot of long work.
pub struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G> Guarded<G> {
    /// `inner`, holding `guard` for as long as it lives.
    pub fn new(inner: Body, guard: G) -> Self {
        Guarded {
            inner,
            _guard: guard,
        }
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_431_answer_declares_its_length() {
        let text = std::str::from_utf8(HEAD_TOO_LARGE).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        assert!(body.contains(&MAX_HEAD_BYTES.to_string()));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn heads_are_measured_to_their_blank_line() {
        let mut scan = HeadScan::default();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!scan.over_limit(head, 0));
        assert!(scan.ended);
        // What follows the head (a body) is not counted.
        assert!(!scan.over_limit(&vec![b'a'; 2 * MAX_HEAD_BYTES], 0));
        // The next request's head is, from its start.
        assert!(!scan.over_limit(b"GET / HTTP/1.1\r\n", 1));
        assert!(!scan.ended);
        let filler = vec![b'a'; MAX_HEAD_BYTES];
        assert!(scan.over_limit(&filler, 1));
        // Bare line feeds end a head too.
        let mut scan = HeadScan::default();
        assert!(!scan.over_limit(b"GET / HTTP/1.1\nHost: x\n\n", 0));
        assert!(scan.ended);
    }

    #[test]
    fn the_cap_leaves_the_reserve_free() {
        assert_eq!(fd_budget(8192, Some(1024), FD_RESERVE), 1024 - 128);
        assert_eq!(fd_budget(100, Some(1 << 20), FD_RESERVE), 100);
        assert_eq!(fd_budget(100, None, FD_RESERVE), 100);
        assert_eq!(fd_budget(100, Some(10), FD_RESERVE), 1);
    }
}
