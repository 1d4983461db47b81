//! What a crashed rave left behind (containers and networks labelled with its pid) is removed
//! by the next one; other raves' containers are kept.

use std::collections::HashMap;

use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};

use super::{DockerExecutor, LABEL};

impl DockerExecutor {
    /// Remove the containers an earlier rave left behind (it crashed or was killed): labelled
    /// `rave`, made by a rave process that no longer runs. Other raves' containers are kept.
    pub async fn sweep(&self) -> usize {
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![LABEL])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .unwrap_or_default();
        let mut n = 0;
        for c in list {
            if owner_alive(c.labels.as_ref()) {
                continue;
            }
            if let Some(id) = c.id {
                if self.remove(&id).await.is_ok() {
                    n += 1;
                }
            }
        }
        // Networks after containers: a network with containers on it cannot be removed.
        let opts = ListNetworksOptionsBuilder::new().filters(&filters).build();
        for net in self
            .docker
            .list_networks(Some(opts))
            .await
            .unwrap_or_default()
        {
            if owner_alive(net.labels.as_ref()) {
                continue;
            }
            if let Some(name) = net.name {
                let _ = self.docker.remove_network(&name).await;
            }
        }
        n
    }
}

/// Does the rave named in these labels still run?
fn owner_alive(labels: Option<&HashMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get("rave.pid"))
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}
