//! Images: pull policies (`if-not-present`, `never`, `always`) and making sure a job's image
//! is there before its container is created.

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;

use super::DockerExecutor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    IfNotPresent,
    Never,
    Always,
}

impl PullPolicy {
    pub fn parse(s: &str) -> Option<PullPolicy> {
        Some(match s {
            "if-not-present" => PullPolicy::IfNotPresent,
            "never" => PullPolicy::Never,
            "always" => PullPolicy::Always,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
            PullPolicy::Always => "always",
        }
    }
}

impl DockerExecutor {
    pub(super) async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), String> {
        let present = self.docker.inspect_image(image).await.is_ok();
        if present && policy != PullPolicy::Always {
            return Ok(());
        }
        if policy == PullPolicy::Never {
            return Err(format!(
                "image `{image}` is not on this machine and its pull_policy is `never`; build or load it first (docker load / docker import), or allow pulling"
            ));
        }
        let opts = CreateImageOptionsBuilder::new().from_image(image).build();
        let mut pull = self.docker.create_image(Some(opts), None, None);
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                if present {
                    // `always` but the registry is unreachable: the local copy will do.
                    return Ok(());
                }
                let why = e.to_string();
                let short = why.lines().next().unwrap_or(&why);
                return Err(format!(
                    "image `{image}` is not on this machine and cannot be pulled (pull_policy `{}`): {short}",
                    policy.as_str()
                ));
            }
        }
        Ok(())
    }
}
