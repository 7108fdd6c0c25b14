//! Headers between client and upstream: hop-by-hop removal and the
//! `X-Forwarded-*` / `Forwarded` family.
//!
//! The forwarding headers are always *replaced*, never appended to: sheath
//! is the first proxy that can vouch for the client's address, so whatever
//! the client claims in those headers is discarded.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, TRANSFER_ENCODING,
    UPGRADE,
};

// Each name sheath sets, spelled once: the inserts use the `HeaderName`s,
// the removal lists below the strings.
const XFF: &str = "x-forwarded-for";
const XFP: &str = "x-forwarded-proto";
const XFH: &str = "x-forwarded-host";
const FWD: &str = "forwarded";
const XFCC: &str = "x-forwarded-client-cert";
const CC: &str = "client-cert";
const CCC: &str = "client-cert-chain";

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static(XFF);
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static(XFP);
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static(XFH);
static FORWARDED: HeaderName = HeaderName::from_static(FWD);

static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static(XFCC);
static CLIENT_CERT: HeaderName = HeaderName::from_static(CC);
static CLIENT_CERT_CHAIN: HeaderName = HeaderName::from_static(CCC);

/// The forwarding headers sheath replaces. The lists of names to remove
/// are strings: a header name's string is at hand (a table entry for a
/// standard name), and strings of another length, most of them, differ
/// at the first comparison.
static FORWARDING: [&str; 6] = [XFF, XFP, XFH, "x-forwarded-port", "x-real-ip", FWD];

/// The client identity headers sheath removes from every request.
static IDENTITY: [&str; 4] = [XFCC, CC, CCC, crate::config::DEFAULT_IDENTITY_HEADER];

/// Remove every header of `names` that the map holds, and every header
/// whose name reads as one of them once `_` is taken for `-`: CGI, WSGI
/// and Rack turn both `X-Client-Identity` and `X_Client_Identity` into
/// `HTTP_X_CLIENT_IDENTITY`, so a backend behind them would read a
/// look-alike the client sent as the header sheath set (Puma's
/// CVE-2024-45614; nginx drops every name with `_` for this reason).
///
/// One walk over the map's names notes which of `names` are there, then
/// each goes with one removal. A message carries a handful of headers and
/// rarely any of the ones sheath removes, so the usual cost is the walk
/// alone: no hashing, no allocation, no clone of a name (a look-alike,
/// which is removed by its own name, is the exception). With the
/// `Connection` tokens that need no list (below), a response's strip went
/// from 206 to 140 ns in benches/headers.rs.
///
/// Returns which of `names` were there, one bit each by position.
fn remove_listed(headers: &mut HeaderMap, names: &[&str]) -> u32 {
    debug_assert!(names.len() <= 32, "one bit per name");
    let mut found = 0u32;
    let mut lookalikes = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        if let Some(i) = names.iter().position(|n| reads_as(text, n)) {
            if text == names[i] {
                found |= 1 << i;
            } else {
                lookalikes.push(name.clone());
            }
        }
    }
    let listed = found;
    while found != 0 {
        headers.remove(names[found.trailing_zeros() as usize]);
        found &= found - 1;
    }
    for name in lookalikes {
        headers.remove(name);
    }
    listed
}

/// Do two (lowercase) header names read the same when every `_` is taken
/// for a `-`? Both ways: a configured `identity_header` may be the one
/// with `_`.
fn reads_as(name: &str, listed: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    name.len() == listed.len()
        && name
            .bytes()
            .zip(listed.bytes())
            .all(|(a, b)| a == b || dash(a) == dash(b))
}

/// Remove every identity header a client may have sent, then add the ones
/// sheath vouches for. Runs on every request, also when forwarding is off,
/// so a backend that trusts these headers can never be fooled through
/// sheath.
pub fn set_identity(
    headers: &mut HeaderMap,
    forward: &crate::config::ForwardIdentity,
    identity: Option<&crate::tls::client_auth::ClientIdentity>,
) {
    remove_identity(headers, forward.header.as_ref());
    let Some(id) = identity else {
        return;
    };
    if forward.xfcc {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), header_value(&xfcc(id)));
    }
    if forward.client_cert {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        headers.insert(
            CLIENT_CERT.clone(),
            header_value(&format!(":{}:", b64.encode(&id.cert))),
        );
        if !id.chain.is_empty() {
            let chain: Vec<String> = id
                .chain
                .iter()
                .map(|c| format!(":{}:", b64.encode(c)))
                .collect();
            headers.insert(CLIENT_CERT_CHAIN.clone(), header_value(&chain.join(", ")));
        }
    }
    if let (Some(name), Some(principal)) = (&forward.header, id.principal()) {
        headers.insert(name.clone(), header_value(&escape_controls(principal)));
    }
}

/// Remove from a client's trailers the forwarding and identity names that
/// only sheath may set: RFC 9110 (§6.5.1) forbids merging trailers into
/// the header section, but a backend that did would otherwise read a
/// forwarding address or a client identity the client wrote itself.
/// Its fields that describe a hop or the framing go too, as from an
/// upstream's trailers ([`strip_framing_from_trailers`]).
pub fn strip_from_trailers(trailers: &mut HeaderMap, identity_header: Option<&HeaderName>) {
    remove_listed(trailers, &FORWARDING);
    remove_identity(trailers, identity_header);
    strip_framing_from_trailers(trailers);
}

/// Remove from trailers the fields that describe a hop (`Connection` and
/// what it names, `Keep-Alive`, `Transfer-Encoding`, …) or the message's
/// length, which mean nothing after the body (RFC 9110 §6.5.1). HTTP/2
/// refuses to send a connection-specific field (RFC 9113 §8.2.2): with one
/// in an HTTP/1.1 upstream's trailers, an HTTP/2 client got the body and
/// then a reset stream instead of the response's end.
pub fn strip_framing_from_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers, false);
    trailers.remove(CONTENT_LENGTH);
}

/// Remove every identity header a client may have sent: the ones sheath
/// can set and the listener's own `identity_header`. The default simple
/// header goes too when it is not the configured one: a backend written
/// for sheath's default keeps trusting it after forwarding is switched off
/// or renamed.
fn remove_identity(headers: &mut HeaderMap, identity_header: Option<&HeaderName>) {
    // One walk over the names for both.
    let mut names = [""; IDENTITY.len() + 1];
    names[..IDENTITY.len()].copy_from_slice(&IDENTITY);
    let listed = match identity_header {
        Some(name) => {
            names[IDENTITY.len()] = name.as_str();
            names.len()
        }
        None => IDENTITY.len(),
    };
    remove_listed(headers, &names[..listed]);
}

/// `X-Forwarded-Client-Cert` in Envoy's format: `Hash=…;Subject="…";URI=…;DNS=…`.
pub fn xfcc(id: &crate::tls::client_auth::ClientIdentity) -> String {
    let mut parts = vec![
        format!("Hash={}", id.sha256),
        format!("Subject={}", quote(&id.subject)),
    ];
    for uri in &id.uris {
        parts.push(format!("URI={}", xfcc_value(uri)));
    }
    for dns in &id.dns {
        parts.push(format!("DNS={}", xfcc_value(dns)));
    }
    parts.join(";")
}

/// Envoy quotes values that contain a separator.
fn xfcc_value(v: &str) -> String {
    let v = escape_controls(v);
    if v.contains([',', ';', '=', '"']) {
        quote(&v)
    } else {
        v.into_owned()
    }
}

/// Control characters as `%XX`. A header value cannot hold them, and a
/// URI or DNS name from a certificate (ASCII, but not checked for them)
/// whose value failed to convert left an authenticated client described
/// by an empty header. Nothing valid in a URI or a DNS name is changed: a
/// URI writes a control character as `%XX` anyway.
fn escape_controls(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.bytes().any(|b| b.is_ascii_control()) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        if c.is_ascii_control() {
            let _ = write!(out, "%{:02X}", c as u8);
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Headers that describe one hop (RFC 9110 §7.6.1) and never travel on.
/// `Trailer` is not one of them: it names the trailer fields end to end,
/// and an HTTP/1.1 message's trailers are only written when it is there.
static HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];
/// `transfer-encoding`'s place in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_AT: usize = 6;

/// Does a list-valued header (`Connection`, `TE`), in any of its lines,
/// carry `token`?
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Is the message's transfer coding, if it has one, chunked alone? hyper
/// reads chunked framing and nothing else: with `gzip, chunked` it takes
/// the chunks off and hands on the still-compressed bytes, and once the
/// hop-by-hop `Transfer-Encoding` is gone the next hop would read them as
/// the body itself. Such a message is refused instead, as nginx does
/// (RFC 9112 §6.1: 501 for a request).
pub fn chunked_or_none(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        // Empty list elements count for nothing (RFC 9110 §5.6.1).
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(only), None) => only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// An HTTP/2 client may split its cookies over several `cookie` fields
/// (browsers do, so that HPACK can index each); HTTP/1.1 allows one
/// `Cookie` line, and many servers read only the first. RFC 9113 §8.2.3:
/// joined with "; " before the request goes on over HTTP/1.1.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for crumb in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Made of valid values and "; ", so valid itself.
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, joined);
    }
}

/// May this request's `Upgrade` be passed on, to become a tunnel if the
/// upstream switches? Not when a protocol it offers is HTTP again (`h2c`,
/// `h2`, `HTTP/2.0`) or TLS (RFC 2817, HTTP inside): through the tunnel
/// the upstream would read the client's own requests, whose headers sheath
/// never saw, forged identity headers included ("h2c smuggling"). An `h2c`
/// upgrade over TLS is invalid anyway (RFC 9113 §3.1). Such a request goes
/// on as a plain one, its `Upgrade` removed, which RFC 9110 (§7.8) allows.
pub fn upgrade_allowed(headers: &HeaderMap) -> bool {
    headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .all(|offered| {
            let offered = offered.trim_ascii();
            let name = offered.split(|b| *b == b'/').next().unwrap_or(offered);
            !["h2c", "h2", "http", "tls"]
                .iter()
                .any(|http| name.eq_ignore_ascii_case(http.as_bytes()))
        })
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
/// With `keep_upgrade`, the `Upgrade` header and `Connection: upgrade` are
/// re-added so a protocol switch can pass through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    // What `Connection` names is nearly always a hop-by-hop field that
    // goes anyway (`keep-alive`, `upgrade`, `te`); only other names are
    // collected, so the usual message allocates nothing here.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !HOP_BY_HOP.iter().any(|n| t.eq_ignore_ascii_case(n)))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    debug_assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_AT], "transfer-encoding");
    let found = remove_listed(headers, &HOP_BY_HOP);
    // A message framed both ways was read by its transfer coding (RFC 9112
    // §6.3); with the coding gone, the length it overrode must go too, or
    // the next hop frames the body by it (an upstream's response cut
    // short for an HTTP/1.1 client, a reset HTTP/2 stream).
    if found & (1 << TRANSFER_ENCODING_AT) != 0 {
        headers.remove(CONTENT_LENGTH);
    }
    for name in named {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade);
    }
}

/// Make a request's `Content-Length` one line in plain decimal. hyper
/// accepts a length written more than once if every copy says the same,
/// and leading zeros, and passes the field on as it came: the upstream
/// would get each copy, or `010`, which a parser that reads C's octal
/// takes for 8, leaving the last bytes of the body to be read as the
/// start of the next request on a pooled connection.
///
/// The usual request has one length, or none, without a leading zero:
/// one lookup, no allocation.
pub fn plain_length(headers: &mut HeaderMap) {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return;
    };
    let digits = first.as_bytes();
    // `0` itself is plain.
    let zeros = digits
        .iter()
        .take_while(|d| **d == b'0')
        .count()
        .min(digits.len().saturating_sub(1));
    if zeros == 0 && lengths.next().is_none() {
        return;
    }
    // hyper read the value as digits alone, so what follows the zeros is
    // a valid value.
    if let Ok(plain) = HeaderValue::from_bytes(&digits[zeros..]) {
        headers.insert(CONTENT_LENGTH, plain);
    }
}

/// What the forwarding headers say about the client's address. It is the
/// same for every request on a connection, so it is formatted once per
/// connection instead of once per request; so is the `Forwarded` value for
/// the host the connection's first request named, which nearly every
/// later request names too.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    x_forwarded_for: HeaderValue,
    /// The `for=` element of `Forwarded`.
    forwarded_for: String,
    /// The whole `Forwarded` value for a request that names no host.
    forwarded_without_host: HeaderValue,
    /// The first host named (`Host` or `:authority`) and its `Forwarded`
    /// value.
    first_host: OnceLock<(HeaderValue, HeaderValue)>,
}

impl ClientAddr {
    pub fn new(peer: SocketAddr) -> ClientAddr {
        let ip = super::unmapped(peer).ip();
        let forwarded_for = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            // RFC 7239 §6: IPv6 addresses are bracketed and therefore quoted.
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        ClientAddr {
            x_forwarded_for: header_value(&ip.to_string()),
            forwarded_without_host: header_value(&format!("{forwarded_for};proto=https")),
            forwarded_for,
            first_host: OnceLock::new(),
        }
    }

    /// The first host's own value (a reference count, not a copy) when
    /// `authority` names that host again. It was checked when it came.
    pub fn first_host_named(&self, authority: &str) -> Option<HeaderValue> {
        self.first_host
            .get()
            .filter(|(host, _)| host.as_bytes() == authority.as_bytes())
            .map(|(host, _)| host.clone())
    }

    /// Is `host` the first host this connection's requests named? That
    /// one was checked when it first came, so it need not be again.
    pub fn is_first_host(&self, host: &HeaderValue) -> bool {
        self.first_host
            .get()
            .is_some_and(|(first, _)| first == host)
    }

    /// The whole `Forwarded` value for a request naming `host` (`text`
    /// is the same, as a string).
    fn forwarded_with_host(&self, host: &HeaderValue, text: &str) -> HeaderValue {
        let format = || {
            header_value(&format!(
                "{};host={};proto=https",
                self.forwarded_for,
                quote(text)
            ))
        };
        match self.first_host.get() {
            Some((first, forwarded)) if first == host => forwarded.clone(),
            // Kept for the first host only: a connection whose requests
            // name many hosts formats each and holds one value.
            Some(_) => format(),
            None => {
                let forwarded = format();
                let _ = self.first_host.set((host.clone(), forwarded.clone()));
                forwarded
            }
        }
    }
}

/// Replace the forwarding headers with what sheath knows first-hand. `host`
/// is the request's `Host` (or HTTP/2 `:authority`); one that is not
/// visible ASCII is not repeated.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientAddr, host: Option<&HeaderValue>) {
    remove_listed(headers, &FORWARDING);
    headers.insert(X_FORWARDED_FOR.clone(), client.x_forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    let forwarded = match host.and_then(|h| Some((h, h.to_str().ok()?))) {
        Some((value, text)) => {
            headers.insert(X_FORWARDED_HOST.clone(), value.clone());
            client.forwarded_with_host(value, text)
        }
        None => client.forwarded_without_host.clone(),
    };
    headers.insert(FORWARDED.clone(), forwarded);
}

fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn header_value(s: &str) -> HeaderValue {
    // Inputs are IP addresses and values taken from valid header values,
    // so this cannot fail; fall back to an empty value rather than panic.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_goes_on_once_in_plain_decimal() {
        for (lines, plain) in [
            (&["10"][..], Some("10")),
            (&["0"], Some("0")),
            (&["00"], Some("0")),
            (&["010"], Some("10")),
            (&["10", "10"], Some("10")),
            (&[], None),
        ] {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(CONTENT_LENGTH, HeaderValue::from_static(line));
            }
            plain_length(&mut headers);
            let after: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(after, plain.into_iter().collect::<Vec<_>>(), "{lines:?}");
        }
    }

    #[test]
    fn only_chunked_alone_is_a_transfer_coding_passed_on() {
        let codings = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(TRANSFER_ENCODING, HeaderValue::from_static(line));
            }
            chunked_or_none(&h)
        };
        assert!(codings(&[]));
        assert!(codings(&["chunked"]));
        assert!(codings(&[" Chunked "]));
        assert!(codings(&[", chunked,"]));
        assert!(!codings(&["gzip, chunked"]));
        assert!(!codings(&["gzip", "chunked"]));
        assert!(!codings(&["chunked, chunked"]));
        assert!(!codings(&["gzip"]));
        assert!(!codings(&["identity"]));
    }

    #[test]
    fn forwarded_replaces_client_claims() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        let host = HeaderValue::from_static("app:8443");
        set_forwarded(
            &mut h,
            &ClientAddr::new("[::1]:5000".parse().unwrap()),
            Some(&host),
        );
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app:8443");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"app:8443\";proto=https"
        );
        assert!(h.get("x-real-ip").is_none());
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn underscore_lookalikes_of_listed_names_go_and_other_names_stay() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded_for",
            "x_real_ip",
            "x-forwarded-for-",
            "x_forwarded",
            "accept",
        ] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        remove_listed(&mut h, &FORWARDING);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-forwarded-for-", "x_forwarded"]);
        // Both ways: a configured identity header may be spelt with `_`.
        let mut h = HeaderMap::new();
        h.insert("x-client-id", HeaderValue::from_static("forged"));
        h.insert("x_client_id", HeaderValue::from_static("forged"));
        h.insert("x-client-i_", HeaderValue::from_static("kept"));
        remove_listed(&mut h, &["x_client_id"]);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-client-i_"]);
        assert!(!reads_as("x-client-id", "x-client-if"));
    }

    #[test]
    fn upgrades_back_into_http_are_refused_and_others_pass() {
        let upgrade = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(UPGRADE, HeaderValue::from_static(v));
            }
            upgrade_allowed(&h)
        };
        for allowed in [
            "websocket",
            "WebSocket",
            "SPDY/3.1",
            "tcp",
            "websocket, foo/2",
        ] {
            assert!(upgrade(&[allowed]), "{allowed}");
        }
        for refused in [
            "h2c",
            "H2C",
            "h2",
            "HTTP/2.0",
            "http/1.1",
            "TLS/1.0",
            "websocket, h2c",
        ] {
            assert!(!upgrade(&[refused]), "{refused}");
        }
        // In a second line as well.
        assert!(!upgrade(&["websocket", " h2c "]));
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_line() {
        let mut h = HeaderMap::new();
        for crumb in ["a=1", "b=2", "c=3"] {
            h.append(COOKIE, HeaderValue::from_static(crumb));
        }
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2; c=3"]
        );
        let mut one = HeaderMap::new();
        one.insert(COOKIE, HeaderValue::from_static("a=1; b=2"));
        join_cookies(&mut one);
        assert_eq!(one[COOKIE], "a=1; b=2");
    }

    #[test]
    fn each_request_gets_the_forwarded_value_of_its_own_host() {
        // One connection's requests: the first host's value is kept and
        // must not leak into a request naming another.
        let client = ClientAddr::new("192.0.2.7:1".parse().unwrap());
        for (host, expected) in [
            ("a.example", "for=192.0.2.7;host=\"a.example\";proto=https"),
            ("b.example", "for=192.0.2.7;host=\"b.example\";proto=https"),
            ("a.example", "for=192.0.2.7;host=\"a.example\";proto=https"),
        ] {
            let host = client
                .first_host_named(host)
                .unwrap_or_else(|| HeaderValue::from_static(host));
            let mut h = HeaderMap::new();
            set_forwarded(&mut h, &client, Some(&host));
            assert_eq!(h["forwarded"], expected);
            assert_eq!(h["x-forwarded-host"], host);
        }
        assert_eq!(client.first_host_named("a.example").unwrap(), "a.example");
        assert!(client.first_host_named("b.example").is_none());
    }

    #[test]
    fn mapped_ipv4_is_unmapped() {
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            &ClientAddr::new("[::ffff:192.0.2.7]:1".parse().unwrap()),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=https");
    }

    #[test]
    fn a_host_that_is_not_visible_ascii_is_not_repeated() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_bytes(b"caf\xe9.example").unwrap();
        set_forwarded(
            &mut h,
            &ClientAddr::new("192.0.2.7:1".parse().unwrap()),
            Some(&host),
        );
        assert!(h.get("x-forwarded-host").is_none());
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=https");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        // End to end: it announces the trailers.
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-kept"));
        assert_eq!(h["trailer"], "x-checksum");
    }

    #[test]
    fn connection_tokens_naming_hop_by_hop_fields_remove_nothing_else() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close, Keep-Alive"));
        h.append("connection", HeaderValue::from_static("TE"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-forwarded-for"]);
    }

    #[test]
    fn client_identity_headers_are_removed_without_an_identity() {
        let forged = || {
            let mut h = HeaderMap::new();
            for name in [
                "x-forwarded-client-cert",
                "client-cert",
                "client-cert-chain",
                "x-client-identity",
                "x-spiffe-id",
            ] {
                h.append(name, HeaderValue::from_static("forged"));
                h.append(name, HeaderValue::from_static("forged again"));
            }
            h.insert("x-kept", HeaderValue::from_static("1"));
            h
        };
        let custom = crate::config::ForwardIdentity {
            xfcc: true,
            header: Some(HeaderName::from_static("x-spiffe-id")),
            ..Default::default()
        };
        // Forwarding off: an unconfigured custom name means nothing to
        // sheath and passes. Forwarding to a custom name: that name goes
        // as well as the default one.
        for (forward, kept) in [
            (Default::default(), vec!["x-kept", "x-spiffe-id"]),
            (custom, vec!["x-kept"]),
        ] {
            let mut h = forged();
            set_identity(&mut h, &forward, None);
            let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            assert_eq!(left, kept, "{forward:?}");
        }
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(has_token(&h, &CONNECTION, "upgrade"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }
}
