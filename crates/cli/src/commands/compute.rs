//! `create|get|remove compute`, `get computes` (admin).

use std::path::Path;

use fledge_types::{ComputeId, ComputeSpec};

use super::Ctx;
use crate::{input, output};

/// `create compute FILE`.
pub async fn create(ctx: &Ctx, file: &Path) -> anyhow::Result<()> {
    let spec: ComputeSpec = input::read_json(file)?;
    if spec.api_key.is_empty() {
        return Err(input::InputError::Other(format!(
            "{}: apiKey is required (the deployer authenticates with it)",
            file.display()
        ))
        .into());
    }
    let compute = ctx.client.create_compute(&spec).await?;
    eprintln!("created compute {}", compute.compute_id);
    ctx.created_resource(&compute, |items, _| output::computes(items))
}

/// `get compute ID`.
pub async fn get(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let compute = ctx.client.get_compute(&ComputeId::new(id)).await?;
    ctx.resource(&compute, |items, _| output::computes(items))
}

/// `get computes`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let computes = ctx.client.list_computes().await?;
    ctx.resources(&computes, |items, _| output::computes(items))
}

/// `remove compute ID`.
pub async fn remove(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    ctx.client.delete_compute(&ComputeId::new(id)).await?;
    eprintln!("removed compute {id}");
    Ok(())
}
