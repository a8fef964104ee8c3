//! `create|get|remove dataset`, `get datasets`, and registering dataset files.
//!
//! Datasets are identified by id; names need not be unique (Flame's examples register many
//! datasets called "MNIST dataset"). Commands that name a dataset take an id or a name, and
//! refuse a name several datasets share, listing their ids.

use std::path::Path;

use fledge_client::Client;
use fledge_types::{Dataset, DatasetId, DatasetSpec};

use super::Ctx;
use crate::input::InputError;
use crate::{input, output};

/// `create dataset FILE`.
pub async fn create(ctx: &Ctx, file: &Path) -> anyhow::Result<()> {
    let spec: DatasetSpec = input::read_dataset(file)?;
    let dataset = ctx.client.create_dataset(&spec).await?;
    eprintln!("created dataset {} ({})", dataset.id, dataset.spec.name);
    ctx.created_resource(&dataset, |items, _| output::datasets(items))
}

/// `get dataset ID|NAME`.
pub async fn get(ctx: &Ctx, key: &str) -> anyhow::Result<()> {
    let visible = ctx.client.list_datasets().await?;
    let dataset = resolve(&visible, key)?.clone();
    ctx.resource(&dataset, |items, _| output::datasets(items))
}

/// `get datasets`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let datasets = ctx.client.list_datasets().await?;
    ctx.resources(&datasets, |items, _| output::datasets(items))
}

/// `remove dataset ID|NAME`: a name is looked up among the user's own datasets (only those can
/// be removed).
pub async fn remove(ctx: &Ctx, key: &str) -> anyhow::Result<()> {
    let me = ctx.client.user().await?;
    let visible = ctx.client.list_datasets().await?;
    let id = match visible.iter().find(|d| d.id.as_str() == key) {
        Some(dataset) => dataset.id.clone(),
        None => {
            let own: Vec<Dataset> = visible.into_iter().filter(|d| d.owner == me).collect();
            resolve(&own, key)?.id.clone()
        }
    };
    ctx.client.delete_dataset(&id).await?;
    eprintln!("removed dataset {id}");
    Ok(())
}

/// The dataset `key` names among `datasets`: the one with that id, else the only one with that
/// name. An unknown key and a name several datasets share are errors (the latter lists them).
pub fn resolve<'a>(datasets: &'a [Dataset], key: &str) -> Result<&'a Dataset, InputError> {
    if let Some(dataset) = datasets.iter().find(|d| d.id.as_str() == key) {
        return Ok(dataset);
    }
    let named: Vec<&Dataset> = datasets.iter().filter(|d| d.spec.name == key).collect();
    match named.as_slice() {
        [] => Err(InputError::Other(format!(
            "no dataset has the id or name {key:?} (`fledgectl get datasets` lists them)"
        ))),
        [one] => Ok(one),
        several => Err(InputError::Other(format!(
            "dataset name {key:?} is ambiguous: {} datasets share it; name one by id:\n{}",
            several.len(),
            several
                .iter()
                .map(|d| format!("  {}  realm {}  url {}", d.id, d.spec.realm, d.spec.url))
                .collect::<Vec<_>>()
                .join("\n")
        ))),
    }
}

/// Registers dataset files: an existing dataset of the user's with the same metadata (name,
/// url, realm, format, ...) is reused, otherwise one is created. Names alone do not identify a
/// dataset (several may share one), so a file that differs from every registered dataset is a
/// new dataset. Keeps the user's datasets listed once per command.
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

    /// The id of the user's dataset registered from `spec`, created from `spec` if absent.
    pub async fn ensure(&mut self, spec: &DatasetSpec, source: &Path) -> anyhow::Result<DatasetId> {
        self.ensure_or_lookup(spec, source, true)
            .await?
            .ok_or_else(|| anyhow::anyhow!("dataset {:?} was not created", spec.name))
    }

    /// The id of the user's dataset registered from `spec`, if any; creates nothing.
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
        // The first registered (listing order is creation order) when several are identical.
        if let Some(existing) = known.iter().find(|d| d.spec == *spec) {
            if self.announced.insert(existing.id.clone()) {
                eprintln!("reusing dataset {} ({})", existing.id, spec.name);
            }
            return Ok(Some(existing.id.clone()));
        }
        if !create {
            return Ok(None);
        }
        let dataset = self.client.create_dataset(spec).await?;
        let namesakes = known.iter().filter(|d| d.spec.name == spec.name).count();
        if namesakes > 0 {
            eprintln!(
                "created dataset {} ({}) from {}; {namesakes} other dataset(s) of yours share its name, so name it by id",
                dataset.id,
                spec.name,
                source.display()
            );
        } else {
            eprintln!("created dataset {} ({}) from {}", dataset.id, spec.name, source.display());
        }
        let id = dataset.id.clone();
        self.announced.insert(id.clone());
        known.push(dataset);
        Ok(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use fledge_types::UserId;

    use super::*;

    fn dataset(id: &str, name: &str, realm: &str) -> Dataset {
        Dataset {
            id: DatasetId::new(id),
            owner: UserId::new("ann"),
            spec: DatasetSpec {
                name: name.into(),
                realm: realm.into(),
                url: format!("file:///data/{id}.npz"),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_dataset_is_named_by_id_or_by_a_name_only_it_has() {
        let datasets = [
            dataset("a1", "MNIST dataset", "default/us/west"),
            dataset("b2", "MNIST dataset", "default/eu/uk"),
            dataset("c3", "digits", "default/eu/de"),
        ];
        assert_eq!(resolve(&datasets, "b2").expect("by id").id.as_str(), "b2");
        assert_eq!(resolve(&datasets, "digits").expect("unique name").id.as_str(), "c3");
        let ambiguous = resolve(&datasets, "MNIST dataset").expect_err("shared name").to_string();
        assert!(ambiguous.contains("ambiguous: 2 datasets share it"), "{ambiguous}");
        assert!(ambiguous.contains("a1  realm default/us/west"), "{ambiguous}");
        assert!(ambiguous.contains("b2  realm default/eu/uk"), "{ambiguous}");
        let unknown = resolve(&datasets, "nope").expect_err("unknown").to_string();
        assert!(unknown.contains("no dataset has the id or name \"nope\""), "{unknown}");
        // An id wins over a dataset named like another's id.
        let tricky = [dataset("x", "y", "r"), dataset("y", "z", "r")];
        assert_eq!(resolve(&tricky, "y").expect("id first").id.as_str(), "y");
    }
}
