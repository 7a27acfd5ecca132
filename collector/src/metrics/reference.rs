//! The `prometheus` crate's path to the same exposition: the reference
//! `render_text` is tested against, and what `benches/metrics_render.rs`
//! (which includes this file) compares its speed with. Written against the
//! public API only, so the same file compiles in both.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, Registry, TextEncoder};

use capwatch_collector::events::HistogramView;
use capwatch_collector::metrics::{Detail, FAMILIES, Kind, Sink, collect_into};
use capwatch_collector::state::State;

/// Renders the fleet from [`State`] on every scrape.
pub struct FleetCollector {
    state: Arc<State>,
    detail: Detail,
    descs: Vec<Desc>,
}

impl FleetCollector {
    pub fn new(state: Arc<State>, detail: Detail) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                Desc::new((*name).into(), (*help).into(), Vec::new(), HashMap::new())
                    .expect("metric names in FAMILIES are valid")
            })
            .collect();
        Self {
            state,
            detail,
            descs,
        }
    }
}

/// Series as the `prometheus` crate's protobuf types.
struct ProtoSink(Vec<Vec<Metric>>);

impl ProtoSink {
    fn new() -> Self {
        Self(FAMILIES.iter().map(|_| Vec::new()).collect())
    }

    fn finish(self) -> Vec<MetricFamily> {
        self.0
            .into_iter()
            .zip(FAMILIES)
            .filter(|(metrics, _)| !metrics.is_empty())
            .map(|(metrics, (name, help, kind))| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_string());
                f.set_help((*help).to_string());
                f.set_field_type(match kind {
                    Kind::Counter => MetricType::COUNTER,
                    Kind::Gauge => MetricType::GAUGE,
                    Kind::Histogram => MetricType::HISTOGRAM,
                });
                f.set_metric(metrics);
                f
            })
            .collect()
    }
}

/// A metric with `labels` and no value yet.
fn labelled(labels: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name((*k).to_string());
                l.set_value((*v).to_string());
                l
            })
            .collect(),
    );
    m
}

impl Sink for ProtoSink {
    fn histogram(&mut self, fam: usize, labels: &[(&str, &str)], view: &HistogramView) {
        let mut m = labelled(labels);
        let mut h = Histogram::default();
        h.set_sample_count(view.count);
        h.set_sample_sum(view.sum);
        h.set_bucket(
            view.buckets
                .iter()
                .map(|(bound, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(*n);
                    b
                })
                .collect(),
        );
        m.set_histogram(h);
        self.0[fam].push(m);
    }

    fn series(&mut self, fam: usize, labels: &[(&str, &str)], value: f64) {
        let mut m = labelled(labels);
        if FAMILIES[fam].2 == Kind::Counter {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.0[fam].push(m);
    }
}

impl Collector for FleetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut sink = ProtoSink::new();
        collect_into(&self.state, self.detail, &mut sink);
        sink.finish()
    }
}

/// The registry `/metrics` renders: the fleet plus anything registered later.
pub fn registry(state: Arc<State>, detail: Detail) -> Registry {
    let r = Registry::new();
    r.register(Box::new(FleetCollector::new(state, detail)))
        .expect("a fresh registry accepts the fleet collector");
    r
}

/// The text exposition of `registry`, through the `prometheus` crate's
/// encoder (slower than `render_text`; kept for anything registered
/// besides the fleet, and as the reference `render_text` is tested against).
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::with_capacity(64 * 1024);
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
