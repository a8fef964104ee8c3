//! `create|get|remove design`, `get designs`.

use fledge_types::{DesignId, DesignSpec};

use super::Ctx;
use crate::output;

/// `create design ID`.
pub async fn create(
    ctx: &Ctx,
    id: String,
    name: Option<String>,
    description: String,
) -> anyhow::Result<()> {
    let spec =
        DesignSpec { name: name.unwrap_or_else(|| id.clone()), id: DesignId::new(id), description };
    let design = ctx.client.create_design(&spec).await?;
    eprintln!("created design {}", design.id);
    ctx.created_resource(&design, output::designs)
}

/// `get design ID`.
pub async fn get(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let design = ctx.client.get_design(&DesignId::new(id)).await?;
    ctx.resource(&design, output::designs)
}

/// `get designs`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let designs = ctx.client.list_designs().await?;
    ctx.resources(&designs, output::designs)
}

/// `remove design ID`.
pub async fn remove(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    ctx.client.delete_design(&DesignId::new(id)).await?;
    eprintln!("removed design {id}");
    Ok(())
}
