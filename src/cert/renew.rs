//! When to renew, how long to wait after a failure, and the record of it
//! all ([`CertStatus`]) that logs, readiness and metrics read.
//!
//! Renewal time is computed from the certificate itself: `ratio` of the way
//! through its validity, moved earlier by a random jitter of up to 5% of
//! it (at most an hour) so a fleet started together does not renew
//! together. The validity counts from the moment sheath obtained the
//! certificate, or from its `notBefore` for one found cached.

use std::time::{Duration, SystemTime};

use super::CertInfo;
use crate::config::CertRef;

/// Renewal moment for a certificate found rather than issued (an ACME
/// certificate cached by an earlier run): `ratio` of its lifetime after
/// its `notBefore`. It may have passed already.
pub fn renew_at(info: &CertInfo, ratio: f64) -> SystemTime {
    schedule(info.not_before, info.not_after, ratio)
}

/// Renewal moment for a certificate issued at `now`: `ratio` of what is
/// left of it. Counted from `notBefore`, a certificate backdated by more
/// than `ratio` of its lifetime (a local-CA leaf of seconds, backdated by
/// a quarter of it for clock skew, under a low `renew_ratio`; a CA whose
/// clock is behind) was due as it arrived, and so was each one after it.
pub fn renew_issued_at(info: &CertInfo, ratio: f64, now: SystemTime) -> SystemTime {
    schedule(now.max(info.not_before), info.not_after, ratio)
}

fn schedule(from: SystemTime, until: SystemTime, ratio: f64) -> SystemTime {
    let lifetime = until.duration_since(from).unwrap_or_default();
    let due = from + lifetime.mul_f64(ratio);
    let max_jitter = lifetime.mul_f64(0.05).min(Duration::from_secs(3600));
    due.checked_sub(max_jitter.mul_f64(random_unit()))
        .unwrap_or(due)
}

/// A uniformly distributed number in [0, 1).
fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("system random number generator failed");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// Delay before the next attempt: the backoff step, or the server's
    /// `Retry-After` when that is later (never earlier: a server that asks
    /// for less than our step still gets the step).
    pub fn failed(&mut self, retry_after: Option<SystemTime>) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let asked = retry_after
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        step.max(asked)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What is known about one of a listener's certificates, for logs,
/// readiness and metrics. Times are wall-clock.
#[derive(Debug, Clone, Default)]
pub struct CertStatus {
    pub listener: String,
    /// Which of the listener's certificates.
    pub cert: CertRef,
    /// `local_ca`, `files` or `acme`.
    pub source: &'static str,
    /// The certificate being served, if any.
    pub current: Option<CertInfo>,
    pub renew_at: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<SystemTime>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// When the next attempt after a failure is due.
    pub next_retry: Option<SystemTime>,
    /// Certificates installed since start (the first one included).
    pub installs: u64,
    /// What makes some clients refuse the served chain (see
    /// `chain::problems`): logged once at install, and kept here for as
    /// long as the chain is served.
    pub chain_problems: Vec<String>,
}

impl CertStatus {
    /// A certificate is being served and is within its validity period.
    pub fn valid_now(&self) -> bool {
        let now = SystemTime::now();
        self.current
            .as_ref()
            .is_some_and(|c| c.not_before <= now && now <= c.not_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(lifetime: Duration) -> CertInfo {
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        CertInfo {
            serial: String::new(),
            subject: String::new(),
            issuer: String::new(),
            names: vec![],
            not_before,
            not_after: not_before + lifetime,
            sha256: String::new(),
            is_ca: false,
        }
    }

    #[test]
    fn renews_at_two_thirds_minus_bounded_jitter() {
        let i = info(Duration::from_secs(90 * 24 * 3600));
        let due = i.not_before + Duration::from_secs(60 * 24 * 3600);
        for _ in 0..100 {
            let at = renew_at(&i, 2.0 / 3.0);
            assert!(at <= due && at >= due - Duration::from_secs(3600));
        }
        let short = info(Duration::from_secs(300));
        let due = short.not_before + Duration::from_secs(200);
        let at = renew_at(&short, 2.0 / 3.0);
        assert!(at <= due && at >= due - Duration::from_secs(15));
    }

    #[test]
    fn an_issued_certificate_counts_from_its_issuance_however_backdated() {
        // A 10 s leaf backdated by 2.5 s, under renew_ratio 0.1.
        let i = info(Duration::from_millis(12_500));
        let issued = i.not_before + Duration::from_millis(2_500);
        for _ in 0..100 {
            let at = renew_issued_at(&i, 0.1, issued);
            assert!(at <= issued + Duration::from_secs(1));
            assert!(at >= issued + Duration::from_millis(500));
        }
        // Issued before its notBefore (a CA's clock ahead): from notBefore.
        let early = i.not_before - Duration::from_secs(5);
        assert!(renew_issued_at(&i, 0.5, early) >= i.not_before);
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let steps: Vec<u64> = (0..5).map(|_| b.failed(None).as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 5, 5]);
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(b.failed(Some(later)) > Duration::from_secs(58));
        b.reset();
        assert_eq!(b.failed(None), Duration::from_secs(1));
    }
}
