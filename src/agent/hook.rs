//! Lifecycle hooks (`postStart`, `preStop`), run as the kubelet's handler runner runs
//! them (`pkg/kubelet/lifecycle/handlers.go`): a command in the container, an HTTP GET
//! whose answer is not judged (only a request that fails is), or a sleep. A failure is
//! the kubelet's message, which becomes the container's status message; the event only
//! says that the hook failed (its output may hold secrets).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler};

use super::probe::HttpTarget;
use crate::runtime::Runtime;

/// A hook of one container instance, with what running it needs (owned, so that the
/// supervisor can race it against a stop).
pub struct Hook {
    pub handler: LifecycleHandler,
    pub runtime: Arc<dyn Runtime>,
    pub container_id: String,
    pub container: Container,
    /// `name_namespace(uid)`, as the kubelet names the pod in its messages.
    pub pod: String,
    pub pod_ip: Option<IpAddr>,
}

/// The longest a postStart hook may run. The kubelet gives it no limit; here a hook
/// that never ends would hold its pod's supervisor (and the start of the containers
/// after it) for good, so it is failed after this.
pub const POST_START_LIMIT: Duration = Duration::from_secs(300);

impl Hook {
    /// Runs the hook for at most `limit`: Err with the kubelet's message if it failed.
    pub async fn run(&self, limit: Duration) -> Result<(), String> {
        let name = &self.container.name;
        let pod = &self.pod;
        let handler = &self.handler;
        if let Some(exec) = &handler.exec {
            let command = exec.command.clone().unwrap_or_default();
            let failed = |error: String, output: &str| {
                format!(
                    "Exec lifecycle hook ([{}]) for Container {name:?} in Pod {pod:?} failed - \
                     error: {error}, message: {output:?}",
                    command.join(" ")
                )
            };
            return match self.runtime.exec(&self.container_id, &command, limit).await {
                Ok(out) if out.exit_code == 0 => Ok(()),
                Ok(out) => {
                    let output = String::from_utf8_lossy(&out.output);
                    Err(failed(
                        format!(
                            "command '{}' exited with {}: {output}",
                            command.join(" "),
                            out.exit_code
                        ),
                        &output,
                    ))
                }
                Err(e) => Err(failed(e.to_string(), "")),
            };
        }
        if let Some(http) = &handler.http_get {
            let failed = |error: String| {
                format!(
                    "HTTP lifecycle hook ({}) for Container {name:?} in Pod {pod:?} failed - \
                     error: {error}",
                    http.path.as_deref().unwrap_or("")
                )
            };
            let target = HttpTarget::of(http, &self.container, self.pod_ip).map_err(&failed)?;
            return target.get(limit).await.map(drop).map_err(failed);
        }
        if let Some(sleep) = &handler.sleep {
            let seconds = Duration::from_secs(u64::try_from(sleep.seconds).unwrap_or(0));
            tokio::time::sleep(seconds.min(limit)).await;
            return Ok(());
        }
        Err(format!(
            "Cannot run handler: invalid handler for Container {name:?} in Pod {pod:?}: only \
             exec, httpGet and sleep are supported"
        ))
    }
}
