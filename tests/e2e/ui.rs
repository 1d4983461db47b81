//! The web UI in a real browser: Debian's chromium, headless, driven through chromedriver
//! (WebDriver) against `rave serve` on loopback. Screenshots of every page land in
//! `target/ui-screenshots/` for a person to look at.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::serve::{
    ADMIN, Origin, READER, Server, api_pipeline, config, finished, get, start, text,
};
use crate::support::*;

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port (./x test installs chromium and chromium-driver).
fn chromedriver() -> Driver {
    let exe = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "chromedriver is required for the web UI tests (./x test installs chromium-driver)",
        );
    let port = free_port();
    let child = Command::new(exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    wait_until("chromedriver never listened", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Driver { child, port }
}

fn shots() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn browser(d: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.port))
        .await
        .expect("a chromium session through chromedriver")
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// Poll `f` until it holds (the page updates on its own: SSE, log streaming).
async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("timed out: {what}");
}

async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn sign_in(c: &Client, base: &str, token: &str, ok: bool) {
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The form posts and the server answers: a redirect away, or the form again with an error.
    eventually("signing in never answered", 20, || async {
        if ok {
            c.current_url()
                .await
                .map(|u| u.path() != "/ui/login")
                .unwrap_or(false)
        } else {
            c.find(Locator::Id("login-error")).await.is_ok()
        }
    })
    .await;
}

const PIPELINE: &str = r#"stages: [build, test]
build:
  stage: build
  script:
    - printf '\033[32mcompiled\033[0m\n'
    - mkdir -p out && echo binary > out/app
    - echo "greeting=$GREETING"
  artifacts: {paths: [out/]}
slow:
  stage: test
  needs: [build]
  script:
    - for i in $(seq 1 40); do echo "line $i"; sleep 0.15; done
flaky:
  stage: test
  needs: [build]
  script:
    - test -e FLAG || { echo "failing on purpose"; exit 1; }
deploy:
  stage: test
  needs: [build]
  when: manual
  script: [echo deployed]
"#;

/// The serve tests' helpers use blocking HTTP; inside the browser's runtime they may block
/// this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn job_id(v: &serde_json::Value, name: &str) -> i64 {
    job(v, name)["id"].as_i64().unwrap()
}

#[test]
fn the_web_ui_in_a_real_browser() {
    // flaky fails until this file exists: then its retry passes.
    let flag = tempfile::tempdir().unwrap();
    let pass = flag.path().join("pass");
    let pipeline = PIPELINE.replace("FLAG", &pass.display().to_string());
    let origin = Origin::new(&[(".gitlab-ci.yml", &pipeline)]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s: Server = start(&data.path().join("data"), &cfg);
    let base = s.url.clone();
    let driver = chromedriver();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;

        // Signed out: the UI sends you to sign in; a wrong token is refused.
        c.goto(&format!("{base}/ui/pipelines")).await.unwrap();
        assert!(
            c.current_url()
                .await
                .unwrap()
                .path()
                .starts_with("/ui/login")
        );
        sign_in(&c, &base, "not-a-token", false).await;
        assert!(text_of(&c, "#login-error").await.contains("not known"));
        shot(&c, "login-refused").await;

        // A read token: the list, live.
        sign_in(&c, &base, READER, true).await;
        assert_eq!(c.current_url().await.unwrap().path(), "/ui/pipelines");
        let p1 = blocking(|| api_pipeline(&s, json!({"project": "team/app", "ref": "main"})));
        // The new pipeline announces itself over SSE.
        eventually("the list never saw the new pipeline", 20, || async {
            match c.find(Locator::Id("new-pipelines")).await {
                Ok(e) => e.is_displayed().await.unwrap_or(false),
                Err(_) => false,
            }
        })
        .await;
        c.refresh().await.unwrap();
        let row = format!("tr[data-pipeline=\"{p1}\"]");
        assert!(!text_of(&c, &row).await.is_empty(), "pipeline {p1} listed");
        // The budget bar: what the running job holds (the slow job runs for six seconds).
        eventually(
            "the budget bar never showed the running job",
            20,
            || async {
                text_of(&c, "#budget")
                    .await
                    .contains("1 running job(s) of 1 pipeline(s) hold 512 MiB of 3 GiB of memory and 1 of 2 CPU(s)")
            },
        )
        .await;
        assert!(text_of(&c, "#budget").await.contains("pipeline(s) queued"));
        shot(&c, "pipelines").await;

        // The job page follows a running job's log as it grows.
        let slow = {
            let mut id = None;
            while id.is_none() {
                let v = blocking(|| get(&s, &format!("/api/pipelines/{p1}"), READER));
                id = v["jobs"]
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["name"] == "slow"))
                    .and_then(|j| j["id"].as_i64());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            id.unwrap()
        };
        eventually("slow never started", 30, || async {
            blocking(|| get(&s, &format!("/api/jobs/{slow}"), READER))["job"]["status"] == "running"
        })
        .await;
        c.goto(&format!("{base}/ui/jobs/{slow}")).await.unwrap();
        eventually("the log never showed line 3", 30, || async {
            text_of(&c, "#log").await.contains("line 3")
        })
        .await;
        let early = text_of(&c, "#log").await.len();
        eventually("the log never grew to line 25", 30, || async {
            text_of(&c, "#log").await.contains("line 25")
        })
        .await;
        assert!(text_of(&c, "#log").await.len() > early);
        shot(&c, "job-live-log").await;
        eventually("the job page never saw slow succeed", 30, || async {
            text_of(&c, "#job-status").await == "success"
        })
        .await;

        // The pipeline page: stages as columns, needs as edges, statuses, no buttons for a
        // read token.
        let v = blocking(|| finished(&s, p1));
        assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
        c.goto(&format!("{base}/ui/pipelines/{p1}")).await.unwrap();
        let stages = c.find_all(Locator::Css(".stage h2")).await.unwrap();
        assert_eq!(stages.len(), 2);
        eventually("the graph never drew its needs", 10, || async {
            c.find_all(Locator::Css("svg#edges path.edge"))
                .await
                .map(|v| v.len() == 3)
                .unwrap_or(false)
        })
        .await;
        let flaky = job_id(&v, "flaky");
        assert_eq!(
            text_of(&c, &format!(".job[data-job=\"{flaky}\"] [data-status]")).await,
            "failed"
        );
        assert!(
            c.find_all(Locator::Css("button[data-post]"))
                .await
                .unwrap()
                .is_empty(),
            "a read token sees no buttons"
        );
        shot(&c, "pipeline-read-only").await;

        // The build job's page: ANSI colours as spans, its artifacts.
        c.goto(&format!("{base}/ui/jobs/{}", job_id(&v, "build")))
            .await
            .unwrap();
        eventually("the build log never loaded", 10, || async {
            text_of(&c, "#log .fg32").await == "compiled"
        })
        .await;
        assert!(text_of(&c, ".artifacts").await.contains("out/app"));
        shot(&c, "job-artifacts").await;

        // An admin retries the failed job and plays the manual one.
        c.find(Locator::Css("form.who button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        sign_in(&c, &base, ADMIN, true).await;
        c.goto(&format!("{base}/ui/pipelines/{p1}")).await.unwrap();
        shot(&c, "pipeline-admin").await;
        std::fs::write(&pass, "").unwrap();
        c.find(Locator::Id("retry-failed"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        // GitLab's retry: inside the same pipeline, which turns success live.
        eventually("the retried pipeline never showed success", 60, || async {
            text_of(&c, "#pipeline-status").await == "success"
        })
        .await;
        assert_eq!(
            c.current_url().await.unwrap().path(),
            format!("/ui/pipelines/{p1}"),
            "retried inside its pipeline"
        );
        let retried = blocking(|| finished(&s, p1));
        assert_eq!(retried["pipeline"]["status"], "success", "{retried:#}");
        assert_eq!(job(&retried, "flaky")["attempts"], 2, "{retried:#}");
        assert_eq!(
            job(&retried, "build")["started_at"],
            job(&v, "build")["started_at"],
            "build is not run again"
        );
        // Rendered again now that it has ended (its "Run again" button is back).
        eventually(
            "the ended pipeline was never rendered again",
            20,
            || async { c.find(Locator::Id("rerun")).await.is_ok() },
        )
        .await;
        shot(&c, "pipeline-retried").await;

        let deploy_index = job(&v, "deploy")["index"].as_i64().unwrap();
        // The page renders again once the pipeline has ended; then the manual job's button.
        eventually("the play button never came back", 20, || async {
            c.find(Locator::Id(&format!("play-{deploy_index}")))
                .await
                .is_ok()
        })
        .await;
        c.find(Locator::Id(&format!("play-{deploy_index}")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the played job never succeeded", 60, || async {
            c.find_all(Locator::Css(&format!(
                ".job.status-success[data-index=\"{deploy_index}\"]"
            )))
            .await
            .map(|v| !v.is_empty())
            .unwrap_or(false)
                && text_of(&c, "#pipeline-status").await == "success"
        })
        .await;
        assert_eq!(
            c.current_url().await.unwrap().path(),
            format!("/ui/pipelines/{p1}"),
            "played inside its pipeline"
        );
        // Rendered again now that it has ended (its "Run again" button is back).
        eventually(
            "the ended pipeline was never rendered again",
            20,
            || async { c.find(Locator::Id("rerun")).await.is_ok() },
        )
        .await;
        shot(&c, "pipeline-played").await;

        // Run a pipeline from the list, with a pipeline variable.
        c.goto(&format!("{base}/ui/pipelines")).await.unwrap();
        c.find(Locator::Css("#new-pipeline summary"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.find(Locator::Css("#new-pipeline-form textarea"))
            .await
            .unwrap()
            .send_keys("GREETING=hello from the form")
            .await
            .unwrap();
        shot(&c, "run-pipeline-form").await;
        c.find(Locator::Id("run-pipeline"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the new pipeline's page never opened", 20, || async {
            c.current_url()
                .await
                .map(|u| u.path().starts_with("/ui/pipelines/") && u.path() != format!("/ui/pipelines/{p1}"))
                .unwrap_or(false)
        })
        .await;
        let p2: i64 = c
            .current_url()
            .await
            .unwrap()
            .path()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let v2 = blocking(|| finished(&s, p2));
        assert_eq!(v2["pipeline"]["source"], "api", "{v2:#}");
        let log = blocking(|| text(&s, &format!("/api/jobs/{}/log", job_id(&v2, "build"))));
        assert!(log.contains("greeting=hello from the form"), "{log}");
        c.close().await.unwrap();
    });

    // A session cookie alone cannot change anything: the CSRF header is needed too.
    let login = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{base}/ui/login"))
        .form(&[("token", ADMIN), ("next", "/ui/pipelines")])
        .send()
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/api/pipelines/1/rerun"))
        .header("cookie", &session)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403, "{}", r.text().unwrap_or_default());
    // A login page never sends you to another site.
    let r = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{base}/ui/login"))
        .form(&[("token", READER), ("next", "https://evil.example/")])
        .send()
        .unwrap();
    assert_eq!(r.headers()["location"], "/ui/pipelines");
}
