//! Request counts and latencies per route, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::limit_hits::LimitHits;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<RouteKey, RouteStats>>,
    counters: Mutex<BTreeMap<&'static str, (&'static str, u64)>>,
    /// Counters with one label: (name, label, value) → (help, count).
    labelled: Mutex<BTreeMap<(&'static str, &'static str, &'static str), (&'static str, u64)>>,
    /// Counters by namespace: (name, namespace) → (help, count). Namespaces are created by
    /// the operator, so their number is the operator's bound.
    per_namespace: Mutex<BTreeMap<(&'static str, String), (&'static str, u64)>>,
    /// Gauges that go up and down with what is open (sockets, streams).
    gauges: Mutex<BTreeMap<&'static str, i64>>,
    /// The user API's places for running requests, and how many there are.
    request_places: Mutex<Option<(Arc<tokio::sync::Semaphore>, usize)>>,
    /// Limits clients hit, counted by every layer.
    pub hits: Arc<LimitHits>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone)]
struct RouteKey {
    api: &'static str,
    method: String,
    route: String,
    status: u16,
}

#[derive(Default)]
struct RouteStats {
    count: u64,
    seconds: f64,
    /// Requests no slower than each bucket's bound (cumulative, as Prometheus wants).
    buckets: [u64; BUCKETS.len()],
}

impl Metrics {
    pub fn record(&self, api: &'static str, method: &str, route: &str, status: u16, elapsed: Duration) {
        let key = RouteKey { api, method: method.to_owned(), route: route.to_owned(), status };
        let secs = elapsed.as_secs_f64();
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let stats = routes.entry(key).or_default();
        stats.count += 1;
        stats.seconds += secs;
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
    }

    /// Adds `by` to the counter `name` (described by `help`).
    pub fn count(&self, name: &'static str, help: &'static str, by: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.entry(name).or_insert((help, 0)).1 += by;
    }

    /// Adds `by` to the counter `name` with `label="value"`; `value` comes from a fixed set,
    /// so a client cannot make new time series.
    pub fn count_by(&self, name: &'static str, help: &'static str, label: &'static str, value: &'static str, by: u64) {
        let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        labelled.entry((name, label, value)).or_insert((help, 0)).1 += by;
    }

    /// Adds `by` to the counter `name` of namespace `ns` (which exists).
    pub fn count_ns(&self, name: &'static str, help: &'static str, ns: &crate::namespace::NamespaceName, by: u64) {
        let mut counters = self.per_namespace.lock().unwrap_or_else(|e| e.into_inner());
        match counters.get_mut(&(name, ns.as_str().to_owned())) {
            Some(counter) => counter.1 += by,
            None => _ = counters.insert((name, ns.as_str().to_owned()), (help, by)),
        }
    }

    /// The user API's places for running requests (HTTP and WebSocket), for the gauge
    /// `sqld_requests_running`.
    pub fn watch_request_places(&self, places: Arc<tokio::sync::Semaphore>, total: usize) {
        *self.request_places.lock().unwrap_or_else(|e| e.into_inner()) = Some((places, total));
    }

    /// Moves the gauge `name` by `delta`.
    pub fn gauge_add(&self, name: &'static str, delta: i64) {
        *self.gauges.lock().unwrap_or_else(|e| e.into_inner()).entry(name).or_insert(0) += delta;
    }

    /// The Prometheus exposition text, with `gauges` (name, help, value) appended.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# HELP sqld_http_requests_total HTTP requests served, by API, method, route and status.\n");
        out.push_str("# TYPE sqld_http_requests_total counter\n");
        for (key, stats) in routes.iter() {
            let _ = writeln!(out, "sqld_http_requests_total{{{}}} {}", labels(key), stats.count);
        }
        out.push_str("# HELP sqld_http_request_duration_seconds Time to answer an HTTP request.\n");
        out.push_str("# TYPE sqld_http_request_duration_seconds histogram\n");
        for (key, stats) in routes.iter() {
            let labels = labels(key);
            for (count, bound) in stats.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(out, "sqld_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(out, "sqld_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", stats.count);
            let _ = writeln!(out, "sqld_http_request_duration_seconds_sum{{{labels}}} {}", stats.seconds);
            let _ = writeln!(out, "sqld_http_request_duration_seconds_count{{{labels}}} {}", stats.count);
        }
        for (name, (help, value)) in self.counters.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let mut named = None;
        for ((name, ns), (help, count)) in self.per_namespace.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if named != Some(*name) {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                named = Some(*name);
            }
            let _ = writeln!(out, "{name}{{namespace=\"{}\"}} {count}", escape(ns));
        }
        let mut named = None;
        for ((name, label, value), (help, count)) in self.labelled.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if named != Some(*name) {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                named = Some(*name);
            }
            let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
        }
        for (name, value) in self.gauges.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
        }
        if let Some((places, total)) = &*self.request_places.lock().unwrap_or_else(|e| e.into_inner()) {
            let running = total.saturating_sub(places.available_permits());
            let _ = writeln!(out, "# HELP sqld_requests_running User requests (HTTP and WebSocket) running right now.\n# TYPE sqld_requests_running gauge\nsqld_requests_running {running}");
        }
        out.push_str("# HELP sqld_limit_hits_total Requests and statements refused or stopped at a limit, by limit.\n");
        out.push_str("# TYPE sqld_limit_hits_total counter\n");
        for (limit, hits) in self.hits.all() {
            let _ = writeln!(out, "sqld_limit_hits_total{{limit=\"{limit}\"}} {hits}");
        }
        out.push_str("# HELP sqld_auth_refused_total User requests refused by authentication or authorization, by reason.\n");
        out.push_str("# TYPE sqld_auth_refused_total counter\n");
        for (reason, refused) in self.hits.refusals() {
            let _ = writeln!(out, "sqld_auth_refused_total{{reason=\"{reason}\"}} {refused}");
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}

fn labels(key: &RouteKey) -> String {
    format!("api=\"{}\",method=\"{}\",route=\"{}\",status=\"{}\"", key.api, escape(&key.method), escape(&key.route), key.status)
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_are_cumulative_per_route() {
        let m = Metrics::default();
        m.record("user", "POST", "/v2/pipeline", 200, Duration::from_micros(100));
        m.record("user", "POST", "/v2/pipeline", 200, Duration::from_millis(30));
        let text = m.render(&[("sqld_namespaces_loaded", "Open namespaces.", 3.0)]);
        let labels = "api=\"user\",method=\"POST\",route=\"/v2/pipeline\",status=\"200\"";
        assert!(text.contains(&format!("sqld_http_requests_total{{{labels}}} 2\n")), "{text}");
        assert!(text.contains(&format!("sqld_http_request_duration_seconds_bucket{{{labels},le=\"0.0005\"}} 1\n")));
        assert!(text.contains(&format!("sqld_http_request_duration_seconds_bucket{{{labels},le=\"0.05\"}} 2\n")));
        assert!(text.contains("sqld_namespaces_loaded 3\n"));
    }
}
