//! OpenTelemetry traces: a real OTLP/HTTP receiver started by the test (a loopback HTTP
//! server decoding the protobuf with the official OTLP message types; no collector binary is
//! packaged for this machine), and the span trees `rave run` and `rave serve` send it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value as Json, json};

use crate::serve::{Origin, READER, api_pipeline, config, finished, get, start};
use crate::support::*;

/// An OTLP/HTTP receiver on a free loopback port: every span posted to `/v1/traces`.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert!(line.starts_with("POST /v1/traces "), "{line}");
                let mut len = 0usize;
                let mut protobuf = false;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim().to_ascii_lowercase();
                    if h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if h == "content-type: application/x-protobuf" {
                        protobuf = true;
                    }
                }
                assert!(protobuf, "OTLP/HTTP protobuf");
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        keep.lock().unwrap().extend(ss.spans);
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        Receiver { url, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn attr(s: &Span, key: &str) -> Option<Value> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
}

fn named<'a>(spans: &'a [Span], prefix: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "no span `{prefix}…` in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
}

#[test]
fn a_run_sends_its_span_tree_to_an_otlp_receiver() {
    let rx = Receiver::start();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "build:\n  script: [echo built]\nflaky:\n  allow_failure: false\n  script: [exit 3]\n",
    )]);
    let r = rave(d.path(), &["run", "--json", "--otlp-endpoint", &rx.url]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let trace = v["pipeline"]["trace_id"].as_str().unwrap().to_string();
    let spans = rx.spans();
    assert_eq!(spans.len(), 4, "the run, its load and two jobs: {spans:#?}");
    let run = named(&spans, "rave run");
    assert!(run.parent_span_id.is_empty(), "the run is the root");
    for s in &spans {
        assert_eq!(hex::encode(&s.trace_id), trace, "one trace");
    }
    let build = named(&spans, "job build");
    let flaky = named(&spans, "job flaky");
    for j in [build, flaky] {
        assert_eq!(j.parent_span_id, run.span_id, "jobs under the run");
        assert!(j.end_time_unix_nano >= j.start_time_unix_nano);
        assert!(j.start_time_unix_nano >= run.start_time_unix_nano);
    }
    assert_eq!(
        attr(build, "rave.status"),
        Some(Value::StringValue("success".into()))
    );
    assert!(matches!(attr(build, "rave.peak_memory_bytes"), Some(Value::IntValue(n)) if n > 0));
    assert_eq!(
        attr(flaky, "rave.failure_reason"),
        Some(Value::StringValue("script_failure".into()))
    );
    assert_eq!(flaky.status.as_ref().unwrap().code, 2, "an error span");
    assert_eq!(
        attr(run, "rave.status"),
        Some(Value::StringValue("failed".into()))
    );
}

#[test]
fn an_unreachable_collector_costs_a_warning_not_the_run() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = git_repo(&[(".gitlab-ci.yml", "build:\n  script: [echo built]\n")]);
    let r = rave(
        d.path(),
        &[
            "run",
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{port}"),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("WARNING: traces not sent"),
        "{}",
        r.stderr
    );
}

/// On the server: one trace per pipeline, the server's spans (the pipeline, its webhook
/// intake, its checkout) with the run's and the jobs' under them; the trace id in the API's
/// pipeline and job rows.
#[test]
fn the_server_traces_each_pipeline_from_webhook_to_jobs() {
    let rx = Receiver::start();
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "build:\n  script: [echo built]\ntest:\n  needs: [build]\n  script: [echo tested]\n",
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(
        data.path(),
        &origin,
        &format!("otlp_endpoint = \"{}\"", rx.url),
    );
    let s = start(&data.path().join("data"), &cfg);
    let id = api_pipeline(&s, json!({"project": "team/app", "ref": "main"}));
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    let trace = v["pipeline"]["trace_id"].as_str().unwrap().to_string();
    assert_eq!(trace.len(), 32);
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["trace_id"], Json::String(trace.clone()), "{j:#}");
    }
    wait_until("the server's spans never came", 10, || {
        rx.spans().iter().any(|s| s.name.starts_with("pipeline"))
    });
    let spans = rx.spans();
    for s in &spans {
        assert_eq!(hex::encode(&s.trace_id), trace, "{}", s.name);
    }
    let root = named(&spans, "pipeline");
    assert!(root.parent_span_id.is_empty());
    assert_eq!(named(&spans, "checkout").parent_span_id, root.span_id);
    let intake = named(&spans, "intake");
    assert_eq!(intake.parent_span_id, root.span_id);
    assert_eq!(
        attr(intake, "rave.source"),
        Some(Value::StringValue("api".into()))
    );
    let run = named(&spans, "rave run");
    assert_eq!(
        run.parent_span_id, root.span_id,
        "the run under the pipeline"
    );
    for job in ["job build", "job test"] {
        assert_eq!(named(&spans, job).parent_span_id, run.span_id, "{job}");
    }
    assert_eq!(
        attr(named(&spans, "job test"), "rave.project"),
        Some(Value::StringValue("team/app".into()))
    );
    // The API's job row carries it too, and the UI's job page shows the job's span, the one
    // the run sent.
    let build = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "build")
        .unwrap();
    let job_id = build["id"].as_i64().unwrap();
    assert_eq!(
        get(&s, &format!("/api/jobs/{job_id}"), READER)["job"]["trace_id"],
        Json::String(trace.clone())
    );
    let login = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/ui/login", s.url))
        .form(&[("token", READER), ("next", "/ui/pipelines")])
        .send()
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    let page = reqwest::blocking::Client::new()
        .get(format!("{}/ui/jobs/{job_id}", s.url))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains(&trace), "{page}");
    let span = hex::encode(&named(&spans, "job build").span_id);
    assert!(
        page.contains(&span),
        "the job page names the span the run sent: {span}"
    );
}

/// Every job gets its span as a W3C `TRACEPARENT` (and the endpoint), so what runs inside it
/// joins the trace: `rave release create` adds its signing as a span under the release job's.
/// Loading the pipeline file is a span too.
#[test]
fn jobs_carry_their_span_and_the_release_signing_hangs_under_its_job() {
    let rx = Receiver::start();
    let keys = tempfile::tempdir().unwrap();
    let r = rave(keys.path(), &["keys", "generate", "--dir", "k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let private = std::fs::read_to_string(keys.path().join("k/rave-release")).unwrap();
    let d = git_repo(&[
        ("app.txt", "v1\n"),
        (
            ".gitlab-ci.yml",
            "release:\n  script:\n    - echo \"tp=$TRACEPARENT\"\n    - mkdir -p release && cp app.txt release/\n    - rave release create --dir release\n",
        ),
    ]);
    sh(d.path(), "git tag v1.0.0");
    let key_var = format!("RAVE_SIGNING_KEY={private}");
    let r = rave(
        d.path(),
        &[
            "run",
            "--json",
            "--tag",
            "v1.0.0",
            "--var",
            &key_var,
            "--otlp-endpoint",
            &rx.url,
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let spans = rx.spans();
    let job = named(&spans, "job release");
    let log = std::fs::read_to_string(d.path().join(".rave/runs/1/logs/000-release.log")).unwrap();
    assert!(
        log.contains(&format!(
            "tp=00-{}-{}-01",
            hex::encode(&job.trace_id),
            hex::encode(&job.span_id)
        )),
        "the job's TRACEPARENT names its span: {log}"
    );
    let sign = named(&spans, "release sign v1.0.0");
    assert_eq!(sign.parent_span_id, job.span_id, "signing under the job");
    assert_eq!(sign.trace_id, job.trace_id);
    let load = named(&spans, "load pipeline");
    assert_eq!(load.parent_span_id, named(&spans, "rave run").span_id);
}
