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
    ctx.created(&compute, compute.compute_id.as_str(), || {
        output::computes(std::slice::from_ref(&compute))
    })
}

/// `get compute ID`.
pub async fn get(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let compute = ctx.client.get_compute(&ComputeId::new(id)).await?;
    ctx.show(&compute, || output::computes(std::slice::from_ref(&compute)))
}

/// `get computes`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let computes = ctx.client.list_computes().await?;
    ctx.show(&computes, || output::computes(&computes))
}

/// `remove compute ID`.
pub async fn remove(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    ctx.client.delete_compute(&ComputeId::new(id)).await?;
    eprintln!("removed compute {id}");
    Ok(())
}
