//! The Redfish client against the stand-in service: TLS with its CA, basic
//! auth, both BMC schemas and the PDU, and every way an answer can be bad.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capwatch_common::redfish::{
    Client, FetchError, Options, Reading, parse_environment_metrics, parse_pdu_metrics, parse_power,
};
use capwatch_testkit::redfish::Options as Standin;
use capwatch_testkit::redfish::{Fault, Schema, Service, Slow};

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A client of `service` trusting its CA, with `credentials`.
fn client(service: &Service, files: &Files, credentials: &str) -> Client {
    let mut opts = Options::new(service.url());
    opts.ca_file = service.ca_pem().map(|pem| files.write("ca.pem", pem));
    opts.credentials_file = Some(files.write("cred", credentials));
    opts.timeout = Duration::from_secs(5);
    Client::new(&opts).unwrap()
}

fn reading(
    client: &Client,
    path: &str,
    parse: fn(&serde_json::Value) -> Result<Reading, capwatch_common::redfish::ReadingError>,
) -> Reading {
    parse(&client.get_json(path).unwrap()).unwrap()
}

/// `parse_environment_metrics`, its energy field required to be usable.
fn environment_metrics(
    body: &serde_json::Value,
) -> Result<Reading, capwatch_common::redfish::ReadingError> {
    let parsed = parse_environment_metrics(body)?;
    assert_eq!(parsed.energy_error, None);
    Ok(parsed.reading)
}

/// A redirect could carry the credentials to another host: it is not
/// followed, but answered as the HTTP status it is.
#[test]
fn redirects_are_not_followed() {
    use std::io::{Read, Write};
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!(
        "http://{}/redfish/v1/Chassis",
        elsewhere.local_addr().unwrap()
    );
    let bmc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", bmc.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = bmc.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf).unwrap();
        let answer = format!(
            "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(answer.as_bytes()).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("cred");
    std::fs::write(&cred, "root:pa:ss\n").unwrap();
    let mut opts = Options::new(url);
    opts.credentials_file = Some(cred);
    let err = Client::new(&opts)
        .unwrap()
        .get_json("/redfish/v1/Chassis")
        .unwrap_err();
    server.join().unwrap();
    assert_eq!(err.reason(), "http_status", "{err}");
    assert!(err.to_string().contains("302"), "{err}");
    elsewhere.set_nonblocking(true).unwrap();
    assert!(
        elsewhere.accept().is_err(),
        "the redirect's target was connected to"
    );
}

#[test]
fn both_bmc_schemas_and_the_pdu_read_exactly_over_tls_with_basic_auth() {
    let files = Files::new();
    // (schema, reading path, parser, whether it has energy)
    type Parse = fn(&serde_json::Value) -> Result<Reading, capwatch_common::redfish::ReadingError>;
    let cases: [(Schema, &str, Parse, bool); 4] = [
        (
            Schema::OldPower,
            "/redfish/v1/Chassis/1/Power",
            parse_power,
            false,
        ),
        (
            Schema::NewJoules,
            "/redfish/v1/Chassis/1/EnvironmentMetrics",
            environment_metrics,
            true,
        ),
        (
            Schema::NewKwh,
            "/redfish/v1/Chassis/1/EnvironmentMetrics",
            environment_metrics,
            true,
        ),
        (Schema::Pdu, "Metrics", parse_pdu_metrics, true),
    ];
    for (schema, path, parse, energy) in cases {
        let service = Service::start(Standin::new(schema).tls().auth("root", "pa:ss"));
        service.set_power_mw(8_123_456);
        // An odd amount: kWh counters expose whole 36 mJ steps.
        service.advance_mj(987_654_321_987);
        let mut opts = Options::new(if schema == Schema::Pdu {
            service.pdu_url()
        } else {
            service.url()
        });
        opts.ca_file = Some(files.write("ca.pem", service.ca_pem().unwrap()));
        opts.credentials_file = Some(files.write("cred", "root:pa:ss\n"));
        let c = Client::new(&opts).unwrap();
        let got = reading(&c, path, parse);
        assert_eq!(got.power_milliwatts, Some(8_123_456), "{schema:?}");
        let want = energy.then(|| service.energy_mj());
        assert_eq!(got.energy_millijoules, want, "{schema:?}");
        service.advance_mj(1);
        service.advance_mj(36);
        let again = reading(&c, path, parse);
        assert_eq!(
            again.energy_millijoules,
            energy.then(|| service.energy_mj()),
            "{schema:?}"
        );
    }
}

#[test]
fn wrong_credentials_wrong_ca_and_bad_bodies_are_named_errors() {
    let files = Files::new();
    let service = Service::start(Standin::new(Schema::NewJoules).tls().auth("root", "secret"));
    let path = "/redfish/v1/Chassis/1/EnvironmentMetrics";

    let wrong = client(&service, &files, "root:guess");
    let err = wrong.get_json(path).unwrap_err();
    assert!(
        matches!(err, FetchError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&service.url()), "{err}");

    // A CA that did not sign the service's certificate.
    let other = Service::start(Standin::new(Schema::NewJoules).tls());
    let mut opts = Options::new(service.url());
    opts.ca_file = Some(files.write("other.pem", other.ca_pem().unwrap()));
    let err = Client::new(&opts).unwrap().get_json(path).unwrap_err();
    assert_eq!(err.reason(), "tls", "{err}");

    // Insecure accepts any certificate.
    let mut opts = Options::new(service.url());
    opts.insecure = true;
    opts.credentials_file = Some(files.write("cred2", "root:secret"));
    Client::new(&opts).unwrap().get_json(path).unwrap();

    let good = client(&service, &files, "root:secret");
    service.set_fault(Fault::ServerError);
    assert!(matches!(
        good.get_json(path).unwrap_err(),
        FetchError::Status { status: 500, .. }
    ));
    service.set_fault(Fault::Garbage);
    assert_eq!(good.get_json(path).unwrap_err().reason(), "not_json");
    for (fault, reason) in [
        (Fault::NegativeWatts, "negative"),
        (Fault::AbsurdWatts, "absurd"),
    ] {
        service.set_fault(fault);
        let body = good.get_json(path).unwrap();
        assert_eq!(
            parse_environment_metrics(&body).unwrap_err().reason(),
            reason
        );
    }
    service.set_fault(Fault::None);

    let mut opts = Options::new(service.url());
    opts.ca_file = Some(files.write("ca3.pem", service.ca_pem().unwrap()));
    opts.credentials_file = Some(files.write("cred3", "root:secret"));
    opts.max_body_bytes = 64;
    let err = Client::new(&opts).unwrap().get_json(path).unwrap_err();
    assert_eq!(err.reason(), "too_large", "{err}");

    let mut opts = Options::new(service.url());
    opts.ca_file = Some(files.write("ca4.pem", service.ca_pem().unwrap()));
    opts.credentials_file = Some(files.write("bad", "no colon here\n"));
    let err = Client::new(&opts).unwrap_err().to_string();
    assert!(
        err.contains("bad") && err.contains("user:password"),
        "{err}"
    );
}

#[test]
fn a_hung_service_ends_at_the_deadline() {
    let service = Service::start(Standin::new(Schema::OldPower));
    service.set_slow(Slow::Forever);
    let mut opts = Options::new(service.url());
    opts.timeout = Duration::from_millis(300);
    let c = Client::new(&opts).unwrap();
    let start = Instant::now();
    let err = c.get_json("/redfish/v1/Chassis/1/Power").unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    service.release();
    service.set_slow(Slow::No);
    c.get_json("/redfish/v1/Chassis/1/Power").unwrap();
    assert!(service.reading_requests() >= 2);
}
