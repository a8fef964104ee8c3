//! `create|update schema FILE --design ID` (a new revision), `get schema --design ID`.

use std::path::Path;

use fledge_types::{DesignId, Schema};

use super::Ctx;
use crate::input;

/// Uploads `file` as the next schema revision of `design`.
pub async fn upload(ctx: &Ctx, design: &str, file: &Path) -> anyhow::Result<()> {
    let schema: Schema = input::read_json(file)?;
    let version = ctx.client.create_schema(&DesignId::new(design), &schema).await?;
    eprintln!("stored schema version {version} of design {design}");
    let answer = serde_json::json!({ "designId": design, "version": version });
    ctx.created(&answer, &version, || format!("{version}\n"))
}

/// Prints a schema (latest or `version`); JSON unless `-o yaml` (a schema is no table).
pub async fn get(ctx: &Ctx, design: &str, version: Option<&str>) -> anyhow::Result<()> {
    let design = DesignId::new(design);
    let schema = match version {
        Some(version) => ctx.client.get_schema_version(&design, version).await?,
        None => {
            let latest = ctx.client.get_schema(&design).await?;
            if let Some(version) = &latest.version {
                eprintln!("schema version {version}");
            }
            latest.schema
        }
    };
    ctx.show(&schema, || serde_json::to_string_pretty(&schema).unwrap_or_default())
}
