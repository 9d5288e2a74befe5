//! Structured logs from day one: JSON lines when not on a terminal, readable text on one.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,sqlx=warn";

pub fn init() {
    // Unset, the default; set but not a filter, the default too, said once it logs.
    let (filter, refused) = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Err(_) => (EnvFilter::new(DEFAULT_FILTER), None),
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some((text, error))),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::io::stderr().is_terminal() {
        builder.compact().try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
    if let Some((text, error)) = refused {
        tracing::warn!(
            rust_log = %text,
            %error,
            "RUST_LOG is not a log filter: logging with the default ({DEFAULT_FILTER})"
        );
    }
}

static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Bucket bounds, in seconds, of the requests' and commands' time histograms: from a
/// fraction of a millisecond to the 5 s bound of the wait for the read models.
const COMMAND_SECONDS: &[f64] = &[
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Buckets of `orgledger_group_commit_appends` (a group carries at most about 1,000 events)
/// and of `orgledger_kept_responses_per_commit` (at most 256).
const GROUP_APPENDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The process-wide Prometheus recorder (installed on first use). The requests' and
/// commands' times and the group commits' sizes are histograms with buckets, which
/// aggregate across instances; other timings stay summaries.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    METRICS
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Prefix("orgledger_command_".into()),
                    COMMAND_SECONDS,
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("orgledger_http_request_duration_seconds".into()),
                    COMMAND_SECONDS,
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("orgledger_group_commit_appends".into()),
                    GROUP_APPENDS,
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("orgledger_kept_responses_per_commit".into()),
                    GROUP_APPENDS,
                )
                .expect("the bucket list is not empty")
                .install_recorder()
                .inspect(|_| {
                    describe_metrics();
                    // Exported from the start, at 0: an alert on `increase()` sees the first
                    // rise from 0 to 1, which it would miss if the series first appeared at 1.
                    for counter in [
                        "orgledger_snapshots_unopened_total",
                        "orgledger_events_appended_total",
                    ] {
                        metrics::counter!(counter).absolute(0);
                    }
                })
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// The `# HELP` line of every metric the service exports.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "orgledger_http_requests_total",
        "HTTP requests answered, by method, route and status."
    );
    describe_histogram!(
        "orgledger_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route."
    );
    describe_counter!(
        "orgledger_commands_total",
        "Commands (a route's POST, PUT, PATCH or DELETE), by outcome: committed (2xx), \
         replayed (a kept response to a repeated Idempotency-Key), rejected (4xx) or failed (5xx)."
    );
    describe_counter!(
        "orgledger_events_appended_total",
        "Events appended to the log by this process."
    );
    describe_counter!(
        "orgledger_snapshots_unopened_total",
        "Snapshots, current or kept, that did not open under their organization's key \
         (altered, relabelled or damaged) and were read around: their events replayed \
         instead. `orgledger verify` names them."
    );
    describe_histogram!(
        "orgledger_group_commit_appends",
        "Commands' appends committed together in one statement (PostgreSQL)."
    );
    describe_histogram!(
        "orgledger_kept_responses_per_commit",
        "Keyed commands' responses kept together in one statement (PostgreSQL)."
    );
    describe_histogram!(
        "orgledger_command_commit_seconds",
        Unit::Seconds,
        "Time from a command's start to its events' commit."
    );
    describe_histogram!(
        "orgledger_command_read_model_wait_seconds",
        Unit::Seconds,
        "Time a committed command waited for the read models to show it."
    );
    describe_gauge!(
        "orgledger_projection_lag_seconds",
        Unit::Seconds,
        "Age of the oldest event a projection has not applied yet."
    );
    describe_gauge!(
        "orgledger_projection_backlog_events",
        "Events in the log a projection has not applied yet."
    );
    describe_gauge!(
        "orgledger_projection_failing",
        "1 while a projection's last batch failed, else 0."
    );
    describe_counter!(
        "orgledger_projection_events_applied_total",
        "Events a projection applied in this process since it started."
    );
    describe_counter!(
        "orgledger_projection_batches_applied_total",
        "Batches a projection applied in this process since it started."
    );
    describe_counter!(
        "orgledger_projection_failures_total",
        "Failed batches of a projection in this process since it started."
    );
    describe_gauge!(
        "orgledger_uptime_seconds",
        Unit::Seconds,
        "Seconds since the service started."
    );
}

#[cfg(test)]
mod tests {
    /// Nothing in this test process reads around a snapshot: the series is there only
    /// because it starts at 0.
    #[test]
    fn counters_an_alert_watches_are_exported_before_they_first_count() {
        let rendered = super::metrics_handle().render();
        for counter in [
            "orgledger_snapshots_unopened_total",
            "orgledger_events_appended_total",
        ] {
            assert!(
                rendered
                    .lines()
                    .any(|line| line.starts_with(&format!("{counter} "))),
                "{counter} missing: {rendered}"
            );
        }
    }
}
