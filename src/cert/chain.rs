//! What is wrong with a certificate chain that clients may still accept.
//!
//! Loading refuses what no client can accept (see `certified_key`): a chain
//! that does not parse, a key that is not the leaf's, a leaf outside its
//! validity period. What is checked here is different: a chain whose
//! intermediates do not lead from the leaf, or have expired, fails only for
//! some clients. One that has the right intermediate cached (browsers keep
//! the ones they have seen, and fetch missing ones from the leaf's AIA), or
//! that trusts the leaf's issuer directly, still connects; one that has
//! neither refuses the chain with "unable to get local issuer certificate".
//!
//! Such a chain is served as it is, with a warning, as HAProxy, nginx and
//! Caddy serve it (without the warning). Refusing it would turn a partial
//! outage into a complete one: at startup nothing would be served, and on a
//! rotation the previous certificate would keep serving until it expired.
//! An expired intermediate is no different: in September 2021 Let's
//! Encrypt's default chain ended in a cross-signed certificate that had
//! expired, on purpose, and every client holding the newer root went on
//! connecting. Nor is the chain reordered: what is served is what the file
//! says, and the warning says which order would be right.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate, X509Error};

use super::inspect::distinguished_name;

/// The problems of `chain` (leaf first) that make some clients refuse it,
/// each a sentence naming the certificates by position (1 is the leaf)
/// and subject. Empty for a chain every client that trusts its root
/// accepts, a chain that includes its root among them: sending the root
/// is wasted bytes, not a failure.
///
/// The leaf's own validity is not looked at: outside it, the material is
/// refused before this is asked.
pub fn problems(chain: &[CertificateDer<'_>], now: SystemTime) -> Vec<String> {
    let Ok(certs) = chain
        .iter()
        .map(|der| X509Certificate::from_der(der.as_ref()).map(|(_, cert)| cert))
        .collect::<Result<Vec<_>, _>>()
    else {
        // Loading has parsed every certificate already.
        return Vec::new();
    };
    let now = unix_seconds(now);
    let mut problems = Vec::new();
    problems.extend(issuance_problem(&certs));
    for (i, cert) in certs.iter().enumerate().skip(1) {
        let validity = cert.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if now > not_after {
            problems.push(format!(
                "{} expired at {}: clients that need it to reach a root they trust refuse the chain; replace it with its CA's current one",
                describe(&certs, i),
                rfc3339(not_after),
            ));
        } else if now < not_before {
            problems.push(format!(
                "{} is not valid before {}: clients that need it to reach a root they trust refuse the chain until then",
                describe(&certs, i),
                rfc3339(not_before),
            ));
        }
    }
    problems
}

/// The first place where a certificate is not followed by its issuer.
///
/// Only the first is reported: whatever follows depends on how that one is
/// fixed, and reporting it too would mostly repeat the same mistake. The
/// last certificate is not expected to be followed by anything: its issuer
/// is normally a root the clients have.
fn issuance_problem(certs: &[X509Certificate<'_>]) -> Option<String> {
    let (i, verdict) = (0..certs.len().saturating_sub(1))
        .map(|i| (i, issued(&certs[i + 1], &certs[i])))
        .find(|(_, verdict)| *verdict != Issued::Yes)?;
    let (child, next) = (describe(certs, i), describe(certs, i + 1));
    let elsewhere = (0..certs.len())
        .find(|&k| k != i && k != i + 1 && issued(&certs[k], &certs[i]) == Issued::Yes);
    if let Some(k) = elsewhere {
        // Most clients (webpki, OpenSSL, browsers) search the whole chain
        // for an issuer, but TLS 1.2 requires each certificate to be
        // followed by its issuer, and clients that read it so refuse it.
        return Some(format!(
            "{next} did not issue {child}; {} did, and should follow it: clients that read the chain in order refuse it{}",
            describe(certs, k),
            right_order(certs)
                .map(|order| format!(" (the right order is {order})"))
                .unwrap_or_default(),
        ));
    }
    if issued(&certs[i], &certs[i]) == Issued::Yes {
        return Some(format!(
            "{child} is self-signed, so the chain ends there, yet {next} follows it: no client uses it, and it is sent in every handshake"
        ));
    }
    let how = match verdict {
        // The case names alone would miss: the CA replaced its
        // intermediate under the same name (and the old one was left in
        // the file), or another CA uses the same name for its own.
        Issued::NameOnly => format!(
            "; it has the name of certificate {}'s issuer, but not the key that signed it (an intermediate its CA has since replaced, or another CA's of the same name)",
            i + 1
        ),
        _ => String::new(),
    };
    Some(format!(
        "{next} did not issue {child}{how}: clients that do not already have certificate {}'s issuer ({}) refuse the chain",
        i + 1,
        distinguished_name(certs[i].issuer()),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Issued {
    Yes,
    /// The parent's subject is the child's issuer, but its key did not
    /// sign the child.
    NameOnly,
    No,
}

/// Did `parent` issue `child`? Its subject must be the child's issuer, as
/// clients build chains by name, and its key must have signed the child.
fn issued(parent: &X509Certificate<'_>, child: &X509Certificate<'_>) -> Issued {
    let named = parent.subject().as_raw() == child.issuer().as_raw()
        || distinguished_name(parent.subject()) == distinguished_name(child.issuer());
    if !named {
        return Issued::No;
    }
    match child.verify_signature(Some(parent.public_key())) {
        Ok(()) => Issued::Yes,
        // An algorithm x509-parser cannot verify (P-521, Ed448): the name
        // is all there is to go by, and a warning about a chain that may
        // well work would send its owner chasing nothing.
        Err(X509Error::SignatureUnsupportedAlgorithm) => Issued::Yes,
        Err(_) => Issued::NameOnly,
    }
}

/// The order in which every certificate of the chain is followed by its
/// issuer, as positions in the file ("1, 3, 2"), when there is one.
fn right_order(certs: &[X509Certificate<'_>]) -> Option<String> {
    let mut order = vec![0];
    while let Some(k) = (0..certs.len()).find(|&k| {
        !order.contains(&k)
            && issued(
                &certs[k],
                &certs[*order.last().expect("starts with the leaf")],
            ) == Issued::Yes
    }) {
        order.push(k);
    }
    (order.len() == certs.len()).then(|| {
        order
            .iter()
            .map(|k| (k + 1).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// "certificate 2 (CN=Example Intermediate)": position, from 1 for the
/// leaf, and subject, or the names of a leaf with an empty subject.
fn describe(certs: &[X509Certificate<'_>], i: usize) -> String {
    let cert = &certs[i];
    let mut name = distinguished_name(cert.subject());
    if name.is_empty() {
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            name = san
                .value
                .general_names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
        }
    }
    if name.is_empty() {
        name = "no subject".into();
    }
    format!("certificate {} ({name})", i + 1)
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn rfc3339(unix: i64) -> String {
    let t = if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}
