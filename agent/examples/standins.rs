//! Stand-ins for measuring the agent's cost with node power on
//! (`scripts/measure-node-power.sh`): a collector that welcomes and acks
//! every sample, a Redfish BMC (EnvironmentMetrics with an energy sensor,
//! TLS with its own CA, basic auth) and a powercap tree with two packages
//! and their dram. Writes the BMC's CA and credentials and the tree under
//! DIR, prints one line `grpc=URL bmc=URL`, and serves until killed.
#![allow(clippy::unwrap_used)] // a measuring aid: a panic ends the run

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_server::{Ingest, IngestServer};
use capwatch_testkit::redfish::{Options, Schema, Service};

struct Sink;

#[tonic::async_trait]
impl Ingest for Sink {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut epoch = 0;
            while let Some(Ok(msg)) = inbound.next().await {
                let body = match msg.body {
                    Some(pb::agent_message::Body::Hello(h)) => {
                        epoch = h.stream_epoch;
                        pb::collector_message::Body::Welcome(pb::Welcome::default())
                    }
                    Some(pb::agent_message::Body::Batch(b)) => {
                        pb::collector_message::Body::Ack(pb::Ack {
                            stream_epoch: epoch,
                            acked_seq: b.samples.last().map(|s| s.seq).unwrap_or(0),
                            ..Default::default()
                        })
                    }
                    None => continue,
                };
                if tx
                    .send(Ok(pb::CollectorMessage { body: Some(body) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn zone(dir: &std::path::Path, name: &str, energy: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
    std::fs::write(dir.join("max_energy_range_uj"), "262143328850\n").unwrap();
    std::fs::write(dir.join("energy_uj"), format!("{energy}\n")).unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: standins DIR"));
    let bmc = Service::start(
        Options::new(Schema::NewJoules)
            .tls()
            .auth("capwatch", "measure"),
    );
    bmc.set_power_mw(8_400_000);
    std::fs::write(dir.join("bmc-ca.pem"), bmc.ca_pem().unwrap()).unwrap();
    std::fs::write(dir.join("bmc.credentials"), "capwatch:measure\n").unwrap();
    let root = dir.join("powercap");
    zone(&root.join("intel-rapl:0"), "package-0", 1_000_000);
    zone(&root.join("intel-rapl:0/intel-rapl:0:0"), "dram", 1_000);
    zone(&root.join("intel-rapl:1"), "package-1", 2_000_000);
    zone(&root.join("intel-rapl:1/intel-rapl:1:0"), "dram", 2_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "grpc=http://{} bmc={}",
        listener.local_addr().unwrap(),
        bmc.url()
    );
    tonic::transport::Server::builder()
        .add_service(IngestServer::new(Sink))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
        .unwrap();
}
