//! `create|update code PATH --design ID`, `get code --design ID`.

use std::path::{Path, PathBuf};

use fledge_types::DesignId;

use super::Ctx;
use crate::{bundle, output};

/// Uploads a zip file or a directory (zipped on the fly) as the next code revision.
pub async fn upload(ctx: &Ctx, design: &str, path: &Path) -> anyhow::Result<()> {
    let zip = bundle::load(path)?;
    let size = zip.len();
    let revision = ctx.client.upload_code(&DesignId::new(design), zip.into()).await?;
    eprintln!("stored code version {} of design {design} ({size} bytes)", revision.version);
    ctx.created(&revision, &revision.version, || {
        output::table(
            &["VERSION", "SIZE", "SHA256"],
            vec![vec![
                revision.version.clone(),
                revision.size.to_string(),
                revision.sha256.clone(),
            ]],
        )
    })
}

/// Downloads a code revision to `file` (default `<design>-code.zip`).
pub async fn download(
    ctx: &Ctx,
    design: &str,
    version: Option<&str>,
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let design_id = DesignId::new(design);
    let bytes = match version {
        Some(version) => ctx.client.get_code_version(&design_id, version).await?,
        None => ctx.client.get_code(&design_id).await?.1,
    };
    let file = file.unwrap_or_else(|| PathBuf::from(format!("{design}-code.zip")));
    std::fs::write(&file, &bytes)
        .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", file.display()))?;
    eprintln!("wrote {} bytes to {}", bytes.len(), file.display());
    output::emit(&file.display().to_string())?;
    Ok(())
}
