//! `fleettracker simulate`: virtual drivers on a street grid posting to a running server.

use crate::config::SimulateConfig;

pub async fn run(_config: SimulateConfig) -> anyhow::Result<()> {
    anyhow::bail!("simulate is not built yet")
}
