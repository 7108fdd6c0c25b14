//! Clients that write HTTP/2 frames by hand over TLS, for the abuse a
//! well-behaved HTTP/2 library never sends, and the well-behaved clients
//! that must stay served meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::backend::CountingBackend;
use super::client::{self, body_text, get};
use super::{within, Proxy, TestPki};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

pub const NO_ERROR: u32 = 0x0;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;

/// Everything the server sends until it closes, and whether it closed
/// within `bound`: a TLS close, a reset or EOF all count as closed.
pub async fn read_until_closed(
    tls: &mut (impl AsyncReadExt + Unpin),
    bound: Duration,
) -> (Vec<u8>, bool) {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (seen, closed)
}

/// An HTTP listener with `extra` TOML in its table, in front of a backend
/// that counts the connections and requests it gets.
pub async fn guarded(extra: &str) -> (TestPki, CountingBackend, Proxy) {
    let pki = TestPki::new();
    let backend = CountingBackend::start().await;
    let proxy = crate::http::http_proxy(&pki, backend.addr, extra).await;
    (pki, backend, proxy)
}

/// A well-behaved HTTP/1.1 client on a new connection gets its answer.
pub async fn serves_http1(addr: SocketAddr, pki: &TestPki) {
    let mut sender = client::h1(addr, pki.roots()).await;
    let resp = within("response", sender.send_request(get("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "ok");
}

/// The same over HTTP/2.
pub async fn serves_http2(addr: SocketAddr, pki: &TestPki) {
    let mut sender = client::h2(addr, pki.roots()).await;
    let resp = within("response", sender.send_request(client::get_h2("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// An HTTP/2 frame: `kind`, `flags`, on stream `stream`, carrying `payload`.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A SETTINGS frame with these `(identifier, value)` pairs.
pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    h2_frame(SETTINGS, 0, 0, &payload)
}

/// An HPACK integer with an `n`-bit prefix, `flags` in the bits above it.
pub fn hpack_int(flags: u8, n: u32, mut value: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// An HPACK string literal, without Huffman coding.
pub fn hpack_str(s: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0, 7, s.len());
    out.extend_from_slice(s);
    out
}

/// A header block for `GET https://localhost{path}`: the method and scheme
/// from HPACK's static table, the rest literals never added to the
/// dynamic table, so that blocks can be sent in any order.
pub fn get_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x87];
    block.extend(hpack_int(0x00, 4, 4));
    block.extend(hpack_str(path.as_bytes()));
    block.extend(hpack_int(0x00, 4, 1));
    block.extend(hpack_str(b"localhost"));
    block
}

/// TLS with ALPN h2 to `addr`, the client preface and `initial` SETTINGS
/// written.
pub async fn raw_h2(
    addr: SocketAddr,
    pki: &TestPki,
    initial: &[(u16, u32)],
) -> TlsStream<TcpStream> {
    let mut tls = client::connect(addr, client::client_config(pki.roots(), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(settings(initial));
    tls.write_all(&start).await.unwrap();
    tls
}

/// A frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let code = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(code.try_into().unwrap()))
    }
}

/// The next frame, or `None` once the connection ends.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// Every frame until the connection ends, and whether it ended within
/// `bound`.
pub async fn frames_until_closed(
    r: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    let closed = tokio::time::timeout(bound, async {
        while let Some(frame) = read_frame(r).await {
            frames.push(frame);
        }
    })
    .await
    .is_ok();
    (frames, closed)
}

/// The test process's resident memory in KiB; sheath runs in it.
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
