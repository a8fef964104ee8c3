//! One module per noun; each function is one verb. [`dispatch`] maps the parsed command line
//! onto them. Commands print data to stdout through [`Ctx`] and everything else to stderr.

pub mod code;
pub mod compute;
pub mod config;
pub mod dataset;
pub mod describe;
pub mod design;
pub mod job;
pub mod logs;
pub mod run;
pub mod schema;
pub mod shell;
pub mod user;
pub mod version;
pub mod watch;

use serde::Serialize;

use fledge_client::Client;

use crate::args::{
    Command, CreateCmd, DescribeCmd, Format, GetCmd, JobCmd, JobRefCmd, RemoveCmd, TokenCmd,
    UpdateCmd,
};
use crate::output::{self, Columns, Named};

/// What every command needs: the client and the chosen output format.
pub struct Ctx {
    /// REST client.
    pub client: Client,
    /// `-o`, if given.
    pub format: Option<Format>,
}

impl Ctx {
    /// Prints data: a table unless `-o json|yaml`.
    pub fn show<T: Serialize + ?Sized>(
        &self,
        value: &T,
        table: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let text = output::render(value, self.format.unwrap_or(Format::Table), table)?;
        output::emit(&text)?;
        Ok(())
    }

    /// The table columns `-o` asks for, at the current time.
    pub fn columns(&self) -> Columns {
        Columns { wide: self.format == Some(Format::Wide), now: chrono::Utc::now() }
    }

    /// Prints resources: a table (more columns with `-o wide`), `KIND/ID` lines (`-o name`),
    /// or JSON/YAML of the list.
    pub fn resources<T: Serialize + Named>(
        &self,
        items: &[T],
        table: impl FnOnce(&[T], Columns) -> String,
    ) -> anyhow::Result<()> {
        if self.format == Some(Format::Name) {
            return Ok(output::emit_lines(&output::names(items))?);
        }
        self.show(items, || table(items, self.columns()))
    }

    /// Prints one resource like [`Ctx::resources`] (JSON/YAML of the object itself).
    pub fn resource<T: Serialize + Named>(
        &self,
        item: &T,
        table: impl FnOnce(&[T], Columns) -> String,
    ) -> anyhow::Result<()> {
        if self.format == Some(Format::Name) {
            return Ok(output::emit_lines(&output::names(std::slice::from_ref(item)))?);
        }
        self.show(item, || table(std::slice::from_ref(item), self.columns()))
    }

    /// Prints a created or changed resource: its id unless `-o` asks for a format.
    pub fn created_resource<T: Serialize + Named>(
        &self,
        item: &T,
        table: impl FnOnce(&[T], Columns) -> String,
    ) -> anyhow::Result<()> {
        match self.format {
            None => Ok(output::emit(&item.id())?),
            Some(_) => self.resource(item, table),
        }
    }

    /// Prints a created or changed resource: its id unless `-o` asks for a format.
    pub fn created<T: Serialize + ?Sized>(
        &self,
        value: &T,
        id: &str,
        table: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        match self.format {
            None => output::emit(id)?,
            Some(format) => output::emit(&output::render(value, format, table)?)?,
        }
        Ok(())
    }
}

/// Runs one command.
pub async fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create(create) => match create {
            CreateCmd::Design { id, name, description } => {
                design::create(ctx, id, name, description).await
            }
            CreateCmd::Schema(args) => schema::upload(ctx, &args.design, &args.file).await,
            CreateCmd::Code(args) => code::upload(ctx, &args.design, &args.path).await,
            CreateCmd::Dataset { file } => dataset::create(ctx, &file).await,
            CreateCmd::Job { file } => job::create(ctx, &file).await,
            CreateCmd::Compute { file } => compute::create(ctx, &file).await,
            CreateCmd::User { id, admin } => user::create(ctx, &id, admin).await,
            CreateCmd::Token { user } => user::token(ctx, &user).await,
        },
        Command::Get(get) => match get {
            GetCmd::Design { id } => design::get(ctx, &id).await,
            GetCmd::Designs => design::list(ctx).await,
            GetCmd::Schema { design, version } => {
                schema::get(ctx, &design, version.as_deref()).await
            }
            GetCmd::Code { design, version, file } => {
                code::download(ctx, &design, version.as_deref(), file).await
            }
            GetCmd::Dataset { id } => dataset::get(ctx, &id).await,
            GetCmd::Datasets => dataset::list(ctx).await,
            GetCmd::Job { id } => job::get(ctx, &id).await,
            GetCmd::Jobs { state } => job::list(ctx, state.as_deref()).await,
            GetCmd::Tasks { job } => job::tasks(ctx, &job).await,
            GetCmd::Task { job, task } => job::task(ctx, &job, &task).await,
            GetCmd::Metrics { job, role, round, names } => {
                let filter = job::MetricFilter { role, round, names };
                job::metrics(ctx, &job, &filter).await
            }
            GetCmd::Models { job } => job::models(ctx, &job).await,
            GetCmd::Model { job, round, group, file } => {
                job::model(ctx, &job, round, group.as_deref(), file).await
            }
            GetCmd::Status { job } => job::status(ctx, &job).await,
            GetCmd::Compute { id } => compute::get(ctx, &id).await,
            GetCmd::Computes => compute::list(ctx).await,
            GetCmd::Users => user::list(ctx).await,
        },
        Command::Update(update) => match update {
            UpdateCmd::Schema(args) => schema::upload(ctx, &args.design, &args.file).await,
            UpdateCmd::Code(args) => code::upload(ctx, &args.design, &args.path).await,
            UpdateCmd::Job { id, file } => job::update(ctx, &id, &file).await,
        },
        Command::Remove(remove) => match remove {
            RemoveCmd::Design { id } => design::remove(ctx, &id).await,
            RemoveCmd::Dataset { id } => dataset::remove(ctx, &id).await,
            RemoveCmd::Job { id } => job::remove(ctx, &id).await,
            RemoveCmd::Compute { id } => compute::remove(ctx, &id).await,
        },
        Command::Start(JobRefCmd::Job { id }) => job::start(ctx, &id).await,
        Command::Stop(JobRefCmd::Job { id }) => job::stop(ctx, &id).await,
        Command::Job(JobCmd::Plan { file }) => job::plan(ctx, &file).await,
        Command::Job(JobCmd::Join { id, remint }) => job::join(ctx, &id, &remint).await,
        Command::Job(JobCmd::RevokeKey { id, task }) => job::revoke_key(ctx, &id, &task).await,
        Command::Token(TokenCmd::Create { user, description, expires_in }) => {
            user::create_token(ctx, user.as_deref(), &description, expires_in).await
        }
        Command::Token(TokenCmd::List { user }) => user::list_tokens(ctx, user.as_deref()).await,
        Command::Token(TokenCmd::Revoke { id, user }) => {
            user::revoke_token(ctx, user.as_deref(), &id).await
        }
        Command::Job(JobCmd::Watch(args)) => {
            let options = watch::Options { interval_ms: args.interval_ms, timeout: args.timeout };
            watch::watch_and_report(ctx, &args.id.into(), options).await
        }
        Command::Logs { job, task, follow: false, .. } => logs::print(ctx, &job, &task).await,
        Command::Logs { job, task, follow: true, interval_ms } => {
            logs::follow(ctx, &job, &task, interval_ms).await
        }
        Command::Run(args) => run::run(ctx, &args).await,
        Command::Describe(DescribeCmd::Job { id }) => describe::job(ctx, &id).await,
        Command::Describe(DescribeCmd::Task { job, task }) => {
            describe::task(ctx, &job, &task).await
        }
        Command::Version { .. } | Command::Completion { .. } | Command::Man { .. } => {
            Err(anyhow::anyhow!("this command is handled before connecting"))
        }
        Command::Config(command) => {
            Err(anyhow::anyhow!("config {command:?} is handled before connecting"))
        }
        Command::Login(_) => Err(anyhow::anyhow!("login is handled before connecting")),
        Command::Whoami => {
            let user = ctx.client.whoami().await?;
            ctx.resource(&user, |users, _| output::users(users))
        }
    }
}
