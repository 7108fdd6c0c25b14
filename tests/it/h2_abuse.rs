//! HTTP/2 denial of service by frames a client sends at no cost to itself:
//! control frames whose answers it never reads (CVE-2019-9512, -9515),
//! frames that carry nothing (CVE-2019-9518), streams the server is made
//! to reset itself (CVE-2025-8671, "MadeYouReset"), headers that
//! decompress far past their wire size, and streams past the concurrency
//! bound. Each must cost sheath a bounded amount, reach the backend a
//! bounded number of times, and leave other clients served. PRIORITY and
//! WINDOW_UPDATE floods (CVE-2019-9513, -9516) have no test: h2 keeps no
//! priority tree and answers neither, so they cost sheath a frame parse
//! each, as much as any traffic, with no bound of sheath's to hold.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::h2raw::*;
use crate::common::{within, DEADLINE};

/// Write `unit` over and over, up to `budget` bytes, reading nothing.
/// Returns the bytes written and how it ended: "stalled" when a write made
/// no progress for half a second (sheath stopped reading), "closed" when
/// one failed, "took all" when the whole budget went through.
async fn flood_without_reading(
    w: &mut (impl AsyncWriteExt + Unpin),
    unit: &[u8],
    budget: usize,
) -> (usize, &'static str) {
    let batch = unit.repeat((16 * 1024 / unit.len()).max(1));
    let mut sent = 0;
    while sent < budget {
        match tokio::time::timeout(Duration::from_millis(500), w.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) => return (sent, "closed"),
            Err(_) => return (sent, "stalled"),
        }
    }
    (sent, "took all")
}

#[tokio::test]
async fn ping_and_settings_floods_that_never_read_the_acks_stall_their_connection() {
    let (pki, _backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    for (what, unit) in [
        ("PING", h2_frame(PING, 0, 0, &[7; 8])),
        (
            "SETTINGS",
            settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, 65_535)]),
        ),
    ] {
        let rss = vm_rss_kib();
        let mut tls = raw_h2(addr, &pki, &[]).await;
        // Every frame asks for an ACK that this client never reads: sheath
        // holds one ACK at a time and reads on only once it has written it,
        // so the socket buffers fill and the writes stop. Queued ACKs would
        // let the whole 64 MiB in.
        let (sent, how) = flood_without_reading(&mut tls, &unit, 64 << 20).await;
        assert_eq!(how, "stalled", "{what}: {sent} bytes");
        assert!(
            sent < 24 << 20,
            "{what}: {sent} bytes taken before it stalled"
        );
        // The flooder keeps its connection open while others are served.
        serves_http1(addr, &pki).await;
        serves_http2(addr, &pki).await;
        let grown = vm_rss_kib().saturating_sub(rss);
        assert!(grown < 16 * 1024, "{what}: memory grew by {grown} KiB");
    }
}

#[tokio::test]
async fn empty_frames_end_their_connection() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    // Zero-length DATA without END_STREAM on an open request, and empty
    // CONTINUATION frames of a header block that never ends: neither
    // moves the request on nor counts against a size bound, so each frame
    // costs sheath a wakeup and the client 9 bytes. Up to 1 MiB of each.
    let mut post = vec![0x83, 0x87];
    post.extend(hpack_int(0x00, 4, 4));
    post.extend(hpack_str(b"/length"));
    post.extend(hpack_int(0x00, 4, 1));
    post.extend(hpack_str(b"localhost"));
    let open_body = h2_frame(HEADERS, END_HEADERS, 1, &post);
    let open_block = h2_frame(HEADERS, 0, 1, &get_block("/"));
    for (what, start, empty) in [
        ("DATA", open_body, h2_frame(DATA, 0, 1, &[])),
        (
            "CONTINUATION",
            open_block,
            h2_frame(CONTINUATION, 0, 1, &[]),
        ),
    ] {
        let requests = backend.requests();
        let mut tls = raw_h2(addr, &pki, &[]).await;
        tls.write_all(&start).await.unwrap();
        let flood = empty.repeat((1 << 20) / empty.len());
        // sheath may close before all of it is written.
        let _ = tls.write_all(&flood).await;
        let (frames, closed) = frames_until_closed(&mut tls, Duration::from_secs(5)).await;
        let goaway = frames.iter().find(|f| f.kind == GOAWAY);
        assert!(closed, "{what}: the connection stayed open");
        assert_eq!(
            goaway.and_then(Frame::error_code),
            Some(ENHANCE_YOUR_CALM),
            "{what}: {goaway:?}"
        );
        // The empty DATA frames' request reached the backend, and no more.
        assert!(backend.requests() - requests <= 1, "{what}");
    }
    serves_http1(addr, &pki).await;
    serves_http2(addr, &pki).await;
}

#[tokio::test]
async fn an_hpack_bomb_ends_its_connection_without_reaching_the_backend() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    // The client lets sheath's encoder keep as large a table as it likes:
    // sheath's responses still say a table of at most 4 KiB (h2's own cap),
    // or no table size at all.
    let mut tls = raw_h2(addr, &pki, &[(SETTINGS_HEADER_TABLE_SIZE, u32::MAX)]).await;
    tls.write_all(&h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("/"),
    ))
    .await
    .unwrap();
    let response = within("a response", async {
        loop {
            let frame = read_frame(&mut tls).await.expect("a response");
            if frame.kind == HEADERS && frame.stream == 1 {
                return frame;
            }
        }
    })
    .await;
    let first = response.payload[0];
    if first & 0xe0 == 0x20 {
        let mut size = (first & 0x1f) as usize;
        if size == 0x1f {
            for (i, b) in response.payload[1..].iter().enumerate() {
                size += ((b & 0x7f) as usize) << (7 * i);
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        assert!(
            size <= 4096,
            "sheath's HPACK table may grow to {size} bytes"
        );
    }

    // A 4 KiB field into the dynamic table, then 12,000 one-byte references
    // to it: 48 MiB of header list from a 16 KiB frame.
    let rss = vm_rss_kib();
    let mut block = get_block("/");
    block.push(0x40);
    block.extend(hpack_str(b"x-bomb"));
    block.extend(hpack_str(&[b'a'; 4000]));
    block.extend(std::iter::repeat_n(0xbe, 12_000));
    tls.write_all(&h2_frame(HEADERS, END_HEADERS | END_STREAM, 3, &block))
        .await
        .unwrap();
    let (frames, closed) = frames_until_closed(&mut tls, Duration::from_secs(5)).await;
    let goaway = frames.iter().find(|f| f.kind == GOAWAY);
    assert!(closed, "the connection stayed open: {frames:?}");
    assert_eq!(goaway.and_then(Frame::error_code), Some(ENHANCE_YOUR_CALM));
    let grown = vm_rss_kib().saturating_sub(rss);
    assert!(grown < 16 * 1024, "memory grew by {grown} KiB");
    assert_eq!(backend.requests(), 1, "the bomb reached the backend");
    serves_http2(addr, &pki).await;
}

#[tokio::test]
async fn streams_past_the_concurrency_bound_are_refused_and_bad_stream_ids_end_the_connection() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    // 200 requests at once that the backend holds for a while: 128 are
    // taken, the rest refused with REFUSED_STREAM (RFC 9113 §5.1.2),
    // which tells the client they were never processed.
    let mut tls = raw_h2(addr, &pki, &[]).await;
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let block = get_block("/slow?ms=1500");
        burst.extend(h2_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1 + 2 * i,
            &block,
        ));
    }
    tls.write_all(&burst).await.unwrap();
    let mut refused = 0;
    within("72 refusals", async {
        while refused < 72 {
            let frame = read_frame(&mut tls)
                .await
                .expect("the connection stays open");
            assert_ne!(frame.kind, GOAWAY, "{frame:?}");
            if frame.kind == RST_STREAM {
                assert_eq!(frame.error_code(), Some(REFUSED_STREAM), "{frame:?}");
                refused += 1;
            }
        }
    })
    .await;
    // Others are served meanwhile, on connections of their own.
    serves_http1(addr, &pki).await;
    serves_http2(addr, &pki).await;
    assert_eq!(backend.requests(), 128 + 2);

    // A client may open only odd-numbered streams, each numbered above the
    // last: anything else is a connection error (RFC 9113 §5.1.1).
    let get = |id| h2_frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block("/"));
    for (what, frames) in [
        ("an even stream id", get(2)),
        ("a lower stream id", [get(5), get(3)].concat()),
        ("past the last id", [get(0x7fff_ffff), get(1)].concat()),
    ] {
        let mut tls = raw_h2(addr, &pki, &[]).await;
        tls.write_all(&frames).await.unwrap();
        let (frames, closed) = frames_until_closed(&mut tls, Duration::from_secs(5)).await;
        let goaway = frames.iter().find(|f| f.kind == GOAWAY);
        assert!(closed, "{what}: the connection stayed open");
        assert_eq!(
            goaway.and_then(Frame::error_code),
            Some(PROTOCOL_ERROR),
            "{what}: {goaway:?}"
        );
    }
}

/// `POST /slow?ms=5000` announcing a one-byte body.
fn post_slow() -> Vec<u8> {
    let mut block = vec![0x83, 0x87];
    block.extend(hpack_int(0x00, 4, 4));
    block.extend(hpack_str(b"/slow?ms=5000"));
    block.extend(hpack_int(0x00, 4, 1));
    block.extend(hpack_str(b"localhost"));
    block.extend(hpack_int(0x00, 4, 28));
    block.extend(hpack_str(b"1"));
    block
}

#[tokio::test]
async fn streams_the_server_is_made_to_reset_are_bounded_per_connection() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    let tls = raw_h2(addr, &pki, &[]).await;
    let (mut r, mut w) = tokio::io::split(tls);
    let reader = tokio::spawn(async move { frames_until_closed(&mut r, DEADLINE).await });
    // Requests that announce one byte of body and send two: sheath (h2)
    // resets each stream itself, which frees its slot among the 128 and
    // is no client reset for the rapid-reset bound to count, while the
    // backend goes on working on what it was sent (CVE-2025-8671). Each
    // batch is reset once the backend has it, as an attacker's pause would
    // ensure; 32 batches of 64.
    let mut next = 1u32;
    let mut reached = 0;
    'batches: for _ in 0..32 {
        let first = next;
        let mut open = Vec::new();
        for _ in 0..64 {
            open.extend(h2_frame(HEADERS, END_HEADERS, next, &post_slow()));
            next += 2;
        }
        if w.write_all(&open).await.is_err() {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend.requests() < reached + 64 {
            if reader.is_finished() || Instant::now() > deadline {
                break 'batches;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        reached += 64;
        let mut overrun = Vec::new();
        for id in (first..next).step_by(2) {
            overrun.extend(h2_frame(DATA, END_STREAM, id, b"xx"));
        }
        if w.write_all(&overrun).await.is_err() {
            break;
        }
    }
    let (frames, closed) = within("the flood's connection", reader).await.unwrap();
    let goaway = frames.iter().find(|f| f.kind == GOAWAY);
    let opened = (next - 1) / 2;
    assert!(closed, "the connection stayed open after {opened} streams");
    assert_eq!(
        goaway.and_then(Frame::error_code),
        Some(ENHANCE_YOUR_CALM),
        "{goaway:?}"
    );
    let requests = backend.requests();
    assert!(
        requests < 300,
        "{requests} backend requests from {opened} streams on one connection, {} still being handled",
        backend.handling()
    );
    serves_http1(addr, &pki).await;
    serves_http2(addr, &pki).await;
}
