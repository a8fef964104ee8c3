//! `create|get|remove dataset`, `get datasets`, and registering dataset files by name.

use std::path::Path;

use fledge_client::Client;
use fledge_types::{Dataset, DatasetId, DatasetSpec};

use super::Ctx;
use crate::{input, output};

/// `create dataset FILE`.
pub async fn create(ctx: &Ctx, file: &Path) -> anyhow::Result<()> {
    let spec: DatasetSpec = input::read_dataset(file)?;
    let dataset = ctx.client.create_dataset(&spec).await?;
    eprintln!("created dataset {} ({})", dataset.id, dataset.spec.name);
    ctx.created(&dataset, dataset.id.as_str(), || output::datasets(std::slice::from_ref(&dataset)))
}

/// `get dataset ID`.
pub async fn get(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let dataset = ctx.client.get_dataset(&DatasetId::new(id)).await?;
    ctx.show(&dataset, || output::datasets(std::slice::from_ref(&dataset)))
}

/// `get datasets`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let datasets = ctx.client.list_datasets().await?;
    ctx.show(&datasets, || output::datasets(&datasets))
}

/// `remove dataset ID`.
pub async fn remove(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    ctx.client.delete_dataset(&DatasetId::new(id)).await?;
    eprintln!("removed dataset {id}");
    Ok(())
}

/// Registers datasets by name: an existing dataset of the user's with the same name is reused,
/// otherwise one is created. Keeps the user's datasets listed once per command.
pub struct Registrar<'a> {
    client: &'a Client,
    known: Option<Vec<Dataset>>,
    /// Datasets already reported in this command (one message per dataset).
    announced: std::collections::HashSet<DatasetId>,
}

impl<'a> Registrar<'a> {
    /// A registrar over `client`.
    pub fn new(client: &'a Client) -> Self {
        Self { client, known: None, announced: Default::default() }
    }

    /// The id of the user's dataset named `spec.name`, created from `spec` if absent.
    pub async fn ensure(&mut self, spec: &DatasetSpec, source: &Path) -> anyhow::Result<DatasetId> {
        self.ensure_or_lookup(spec, source, true)
            .await?
            .ok_or_else(|| anyhow::anyhow!("dataset {:?} was not created", spec.name))
    }

    /// The id of the user's dataset named `spec.name`, if registered; creates nothing.
    pub async fn lookup(
        &mut self,
        spec: &DatasetSpec,
        source: &Path,
    ) -> anyhow::Result<Option<DatasetId>> {
        self.ensure_or_lookup(spec, source, false).await
    }

    async fn ensure_or_lookup(
        &mut self,
        spec: &DatasetSpec,
        source: &Path,
        create: bool,
    ) -> anyhow::Result<Option<DatasetId>> {
        if self.known.is_none() {
            let me = self.client.user().await?;
            let mine =
                self.client.list_datasets().await?.into_iter().filter(|d| d.owner == me).collect();
            self.known = Some(mine);
        }
        let known = self.known.get_or_insert_with(Vec::new);
        if let Some(existing) = known.iter().find(|d| d.spec.name == spec.name) {
            if !self.announced.insert(existing.id.clone()) {
                return Ok(Some(existing.id.clone()));
            }
            if existing.spec != *spec {
                eprintln!(
                    "warning: dataset {:?} exists with different metadata; reusing {} (remove it to register {})",
                    spec.name,
                    existing.id,
                    source.display()
                );
            } else {
                eprintln!("reusing dataset {} ({})", existing.id, spec.name);
            }
            return Ok(Some(existing.id.clone()));
        }
        if !create {
            return Ok(None);
        }
        let dataset = self.client.create_dataset(spec).await?;
        eprintln!("created dataset {} ({}) from {}", dataset.id, spec.name, source.display());
        let id = dataset.id.clone();
        self.announced.insert(id.clone());
        known.push(dataset);
        Ok(Some(id))
    }
}
