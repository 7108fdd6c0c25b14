//! Counters kept on the data path, and their Prometheus exposition.
//!
//! The data path only touches plain atomics owned by each listener
//! ([`ListenerStats`]); nothing there takes a lock or looks up a label set.
//! At scrape time a [`Collector`] walks the running listeners, their
//! certificate status and the reload bookkeeping, and encodes everything
//! with `prometheus-client`. Counters of a listener that a reload removed
//! disappear with it; Prometheus treats the series as ended.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::app::{ListenerHandle, Observed};
use crate::tls::handshake::FailureReason;

/// Upper bounds (seconds) of the request latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    failures_by_reason: [AtomicU64; FailureReason::ALL.len()],
    /// HTTP responses by status class, 1xx..5xx.
    responses: [AtomicU64; 5],
    pub latency: LatencyHistogram,
    /// Plaintext bytes from and to clients. Added when a connection
    /// closes, so the hot path touches only per-connection
    /// counters.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// HTTP mode's upstream connections by [`UpstreamKind`]: open now, and
    /// opened in all (a count that keeps climbing under steady load says
    /// the upstream closes idle connections before `upstream_idle`).
    upstream_open: [AtomicU64; UpstreamKind::ALL.len()],
    upstream_opened: [AtomicU64; UpstreamKind::ALL.len()],
}

/// What an HTTP-mode upstream connection speaks, the `protocol` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    Http1,
    H2c,
}

impl UpstreamKind {
    pub const ALL: [UpstreamKind; 2] = [UpstreamKind::Http1, UpstreamKind::H2c];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamKind::Http1 => "http1",
            UpstreamKind::H2c => "h2c",
        }
    }
}

/// An open upstream connection, counted until dropped (when the task
/// driving the connection ends).
#[derive(Debug)]
pub struct UpstreamOpen {
    stats: std::sync::Arc<ListenerStats>,
    kind: UpstreamKind,
}

impl Drop for UpstreamOpen {
    fn drop(&mut self) {
        self.stats.upstream_open[self.kind as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

impl ListenerStats {
    pub fn handshake_failed(&self, reason: FailureReason) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
        self.failures_by_reason[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshake_failures(&self, reason: FailureReason) -> u64 {
        self.failures_by_reason[reason.index()].load(Ordering::Relaxed)
    }

    /// Record one HTTP response (sheath's own or the upstream's).
    pub fn response(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    /// Responses in a status class: 1 for 1xx … 5 for 5xx.
    pub fn responses(&self, class: usize) -> u64 {
        self.responses[class - 1].load(Ordering::Relaxed)
    }

    /// Count an upstream connection just opened, open until the guard drops.
    pub fn upstream_opened(self: &std::sync::Arc<Self>, kind: UpstreamKind) -> UpstreamOpen {
        self.upstream_opened[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.upstream_open[kind as usize].fetch_add(1, Ordering::Relaxed);
        UpstreamOpen {
            stats: std::sync::Arc::clone(self),
            kind,
        }
    }

    /// Upstream connections of `kind` open now, and opened in all.
    pub fn upstream_connections(&self, kind: UpstreamKind) -> (u64, u64) {
        (
            self.upstream_open[kind as usize].load(Ordering::Relaxed),
            self.upstream_opened[kind as usize].load(Ordering::Relaxed),
        )
    }

    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }
}

/// A fixed-bucket histogram of atomics: one `fetch_add` per bucket hit
/// instead of a lock per observation, because every request lands here.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, non-cumulative buckets with `+Inf` last).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(&self.buckets)
            .map(|(le, n)| (le, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// A registry with sheath's collector in it, ready to encode.
pub fn registry(observed: Observed) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SheathCollector(observed)));
    registry
}

/// Encode the registry in the Prometheus/OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// The same exposition in the Prometheus text format (0.0.4), for a
/// scraper that did not ask for OpenMetrics.
///
/// The two differ where sheath's metrics use them: OpenMetrics names a
/// counter family without `_total` and its samples with it, where the text
/// format names both with it (read as text, the samples had no HELP and
/// TYPE, and the counters were untyped); and the text format has no
/// `# UNIT` and no `# EOF`.
pub fn render_text(registry: &Registry) -> String {
    let openmetrics = render(registry);
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters.contains(name).then_some((prefix, name, rest))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Reads one gauge's value off a certificate status, if it has one.
type CertValue = fn(&crate::cert::CertStatus) -> Option<f64>;

#[derive(Debug)]
struct SheathCollector(Observed);

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One metric family: a descriptor, then one sample per label set.
struct Family<'a>(prometheus_client::encoding::MetricEncoder<'a>);

fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
    kind: MetricType,
) -> Result<Family<'a>, std::fmt::Error> {
    Ok(Family(encoder.encode_descriptor(name, help, unit, kind)?))
}

impl Family<'_> {
    /// The family's only sample, without labels.
    fn single<N>(self, value: N) -> Result<(), std::fmt::Error>
    where
        ConstGauge<N>: EncodeMetric,
    {
        ConstGauge::new(value).encode(self.0)
    }

    fn counter(&mut self, labels: &[(&str, &str)], value: u64) -> Result<(), std::fmt::Error> {
        ConstCounter::new(value).encode(self.0.encode_family(&labels)?)
    }

    fn gauge(&mut self, labels: &[(&str, &str)], value: f64) -> Result<(), std::fmt::Error> {
        ConstGauge::new(value).encode(self.0.encode_family(&labels)?)
    }
}

impl Collector for SheathCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let listeners = self.0.listeners.load();
        let reloads = &self.0.reloads;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let seconds_unit = Unit::Seconds;
        let bytes_unit = Unit::Bytes;

        let mut f = family(
            &mut enc,
            "sheath_build_info",
            "sheath version",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1.0)?;
        let f = family(
            &mut enc,
            "sheath_start_time",
            "When this process started, in seconds since the epoch",
            Some(&seconds_unit),
            MetricType::Gauge,
        )?;
        f.single(seconds(self.0.started))?;

        // The standard process families, under the names Prometheus' own
        // client libraries give them, so the usual dashboards and alerts
        // (descriptors in use against the limit) work unchanged.
        let usage = crate::resources::Usage::now();
        let f = family(
            &mut enc,
            "process_cpu",
            "User and system CPU time the process has used",
            Some(&seconds_unit),
            MetricType::Counter,
        )?;
        ConstCounter::new(usage.cpu.as_secs_f64()).encode(f.0)?;
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(&bytes_unit),
                usage.resident_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                usage.open_fds,
            ),
            (
                "process_max_fds",
                "The soft limit on open file descriptors",
                None,
                usage.max_fds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(value) = value {
                family(&mut enc, name, help, unit, MetricType::Gauge)?.single(value as f64)?;
            }
        }

        macro_rules! per_listener {
            ($name:expr, $help:expr, $unit:expr, $kind:ident, |$s:ident| $value:expr) => {{
                let mut f = family(&mut enc, $name, $help, $unit, MetricType::$kind)?;
                for l in listeners.iter() {
                    let $s = &l.stats;
                    per_listener!(@emit f, $kind, &[("listener", l.name.as_str())], $value);
                }
            }};
            (@emit $f:ident, Counter, $labels:expr, $value:expr) => { $f.counter($labels, $value)? };
            (@emit $f:ident, Gauge, $labels:expr, $value:expr) => { $f.gauge($labels, $value as f64)? };
        }

        per_listener!(
            "sheath_connections_accepted",
            "TCP connections accepted",
            None,
            Counter,
            |s| load(&s.accepted)
        );
        per_listener!(
            "sheath_connections_active",
            "Connections open now",
            None,
            Gauge,
            |s| load(&s.active)
        );
        // Counted only where connections are spread over several workers.
        let per_worker = crate::workers::open_connections();
        if !per_worker.is_empty() {
            let mut f = family(
                &mut enc,
                "sheath_worker_connections_active",
                "Connections open now on each worker thread, all listeners together",
                None,
                MetricType::Gauge,
            )?;
            for (worker, open) in per_worker.iter().enumerate() {
                f.gauge(&[("worker", &worker.to_string())], *open as f64)?;
            }
        }
        per_listener!(
            "sheath_received",
            "Decrypted bytes received from clients (counted when a connection closes)",
            Some(&bytes_unit),
            Counter,
            |s| load(&s.bytes_in)
        );
        per_listener!(
            "sheath_sent",
            "Bytes sent to clients before encryption (counted when a connection closes)",
            Some(&bytes_unit),
            Counter,
            |s| load(&s.bytes_out)
        );
        per_listener!(
            "sheath_upstream_connect_failures",
            "Upstream connections refused, timed out or unreachable",
            None,
            Counter,
            |s| load(&s.upstream_connect_failures)
        );
        for (name, help, open) in [
            (
                "sheath_upstream_connections_active",
                "HTTP mode's upstream connections open now, by protocol",
                true,
            ),
            (
                "sheath_upstream_connections_opened",
                "HTTP mode's upstream connections opened, by protocol",
                false,
            ),
        ] {
            let kind = if open {
                MetricType::Gauge
            } else {
                MetricType::Counter
            };
            let mut f = family(&mut enc, name, help, None, kind)?;
            for l in listeners.iter() {
                for protocol in UpstreamKind::ALL {
                    let (now, all) = l.stats.upstream_connections(protocol);
                    let labels = [
                        ("listener", l.name.as_str()),
                        ("protocol", protocol.label()),
                    ];
                    if open {
                        f.gauge(&labels, now as f64)?;
                    } else {
                        f.counter(&labels, all)?;
                    }
                }
            }
        }

        let mut f = family(
            &mut enc,
            "sheath_tls_handshakes",
            "TLS handshakes by outcome and failure reason",
            None,
            MetricType::Counter,
        )?;
        for l in listeners.iter() {
            let name = l.name.as_str();
            f.counter(
                &[("listener", name), ("outcome", "success"), ("reason", "")],
                load(&l.stats.handshakes),
            )?;
            for reason in FailureReason::ALL {
                f.counter(
                    &[
                        ("listener", name),
                        ("outcome", "failure"),
                        ("reason", reason.as_str()),
                    ],
                    l.stats.handshake_failures(reason),
                )?;
            }
        }

        let mut f = family(
            &mut enc,
            "sheath_http_responses",
            "HTTP responses by status class",
            None,
            MetricType::Counter,
        )?;
        for l in listeners.iter() {
            for (class, label) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                f.counter(
                    &[("listener", l.name.as_str()), ("class", label)],
                    l.stats.responses(class + 1),
                )?;
            }
        }

        let mut histogram = enc.encode_descriptor(
            "sheath_http_request_duration",
            "Time from request to response headers",
            Some(&seconds_unit),
            MetricType::Histogram,
        )?;
        for l in listeners.iter() {
            let (sum, count, buckets) = l.stats.latency.snapshot();
            let labels = [("listener", l.name.as_str())];
            histogram
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }

        // Certificates. Absent values (no certificate yet, never failed)
        // are left out rather than reported as 0, which would read as 1970.
        // Each of a listener's certificates is told apart by `cert`:
        // `default`, or `sni_cert[N]` in configuration order.
        let statuses: Vec<_> = listeners
            .iter()
            .flat_map(|l| {
                l.cert_statuses()
                    .into_iter()
                    .map(|s| (l.name.as_str(), s.cert.to_string(), s))
            })
            .collect();
        let cert_gauges: [(&str, &str, CertValue); 6] = [
            (
                "sheath_certificate_not_after",
                "End of the served certificate's validity",
                |s| s.current.as_ref().map(|c| seconds(c.not_after)),
            ),
            (
                "sheath_certificate_not_before",
                "Start of the served certificate's validity",
                |s| s.current.as_ref().map(|c| seconds(c.not_before)),
            ),
            (
                "sheath_certificate_next_renewal",
                "When the next renewal attempt is due",
                |s| s.next_retry.or(s.renew_at).map(seconds),
            ),
            (
                "sheath_certificate_last_renewal_success",
                "When a certificate was last installed",
                |s| s.last_success.map(seconds),
            ),
            (
                "sheath_certificate_last_renewal_failure",
                "When obtaining a certificate last failed",
                |s| s.last_failure.map(seconds),
            ),
            (
                "sheath_certificate_valid",
                "1 when a certificate within its validity period is served",
                |s| Some(if s.valid_now() { 1.0 } else { 0.0 }),
            ),
        ];
        for (name, help, value) in cert_gauges {
            let unit = (name != "sheath_certificate_valid").then_some(&seconds_unit);
            let mut f = family(&mut enc, name, help, unit, MetricType::Gauge)?;
            for (listener, cert, status) in &statuses {
                if let Some(v) = value(status) {
                    f.gauge(
                        &[
                            ("listener", listener),
                            ("cert", cert),
                            ("source", status.source),
                        ],
                        v,
                    )?;
                }
            }
        }
        let mut f = family(
            &mut enc,
            "sheath_certificate_renewal_consecutive_failures",
            "Failed attempts since the last success",
            None,
            MetricType::Gauge,
        )?;
        for (listener, cert, status) in &statuses {
            f.gauge(
                &[
                    ("listener", listener),
                    ("cert", cert),
                    ("source", status.source),
                ],
                f64::from(status.consecutive_failures),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sheath_certificate_installs",
            "Certificates installed, the first one included",
            None,
            MetricType::Counter,
        )?;
        for (listener, cert, status) in &statuses {
            f.counter(
                &[
                    ("listener", listener),
                    ("cert", cert),
                    ("source", status.source),
                ],
                status.installs,
            )?;
        }

        let mut f = family(
            &mut enc,
            "sheath_client_crl_next_update",
            "When the earliest CRL of a listener's client trust is due to be replaced (its nextUpdate); past it, the CRL still applies",
            Some(&seconds_unit),
            MetricType::Gauge,
        )?;
        for l in listeners.iter() {
            if let Some(at) = l
                .client_verifier
                .as_ref()
                .and_then(|v| v.crls_next_update())
            {
                f.gauge(&[("listener", l.name.as_str())], seconds(at))?;
            }
        }

        // Both kinds of trust read from files count their re-reads alike.
        type Reloads = for<'a> fn(&'a ListenerHandle) -> Option<(&'a AtomicU64, &'a AtomicU64)>;
        let trusts: [(&str, &str, Reloads); 2] = [
            (
                "sheath_client_trust_reloads",
                "Client CA bundle and CRL reloads by outcome",
                |l| {
                    let v = l.client_verifier.as_deref()?;
                    Some((&v.reloads, &v.failed_reloads))
                },
            ),
            (
                "sheath_peer_trust_reloads",
                "Outbound peer CA bundle reloads by outcome",
                |l| {
                    let v = l.peer_verifier.as_deref()?;
                    Some((&v.reloads, &v.failed_reloads))
                },
            ),
        ];
        for (name, help, reloads) in trusts {
            let mut f = family(&mut enc, name, help, None, MetricType::Counter)?;
            for l in listeners.iter() {
                if let Some((success, failure)) = reloads(l) {
                    let name = l.name.as_str();
                    f.counter(&[("listener", name), ("outcome", "success")], load(success))?;
                    f.counter(&[("listener", name), ("outcome", "failure")], load(failure))?;
                }
            }
        }

        let mut f = family(
            &mut enc,
            "sheath_config_reloads",
            "Configuration reloads by outcome",
            None,
            MetricType::Counter,
        )?;
        f.counter(&[("outcome", "success")], load(&reloads.succeeded))?;
        f.counter(&[("outcome", "failure")], load(&reloads.failed))?;
        let f = family(
            &mut enc,
            "sheath_config_generation",
            "Configuration generation: 1 at start, +1 per applied reload",
            None,
            MetricType::Gauge,
        )?;
        f.single(load(&reloads.generation) as i64)?;
        if let Some(t) = *reloads.last_success.lock().expect("poisoned") {
            let f = family(
                &mut enc,
                "sheath_config_last_reload_success",
                "When a reload was last applied",
                Some(&seconds_unit),
                MetricType::Gauge,
            )?;
            f.single(seconds(t))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_output() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(30));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 30.0205).abs() < 1e-9);
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets.last(), Some(&(f64::MAX, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 3);
    }

    #[test]
    fn status_classes() {
        let s = ListenerStats::default();
        s.response(200, Duration::ZERO);
        s.response(204, Duration::ZERO);
        s.response(502, Duration::ZERO);
        s.response(101, Duration::ZERO);
        assert_eq!(
            (1..=5).map(|c| s.responses(c)).collect::<Vec<_>>(),
            [1, 2, 0, 0, 1]
        );
    }
}
