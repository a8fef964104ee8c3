//! The tasklet composer (Cisco Flame's idea): a role is a program of named steps.
//!
//! A [`Composer`] holds [`Node`]s: tasklets (an async function of the role's context) and
//! loops (`loop_until(cond) { ... }`) that hold more nodes. Every node has an alias, unique
//! in the composer, so a topology that needs a different role edits the standard one:
//!
//! ```
//! use fledge_sdk::composer::{Composer, Context, tasklet};
//!
//! #[derive(Default)]
//! struct Ctx { round: u64, log: Vec<String> }
//! impl Context for Ctx {}
//!
//! let mut role: Composer<Ctx> = Composer::new()
//!     .tasklet("init", tasklet(|c: &mut Ctx| { c.log.push("init".into()); Ok(()) }))
//!     .loop_until("rounds", |c: &Ctx| c.round >= 2, Composer::new()
//!         .tasklet("train", tasklet(|c: &mut Ctx| { c.round += 1; Ok(()) })));
//! // A custom topology adds a step without forking the role.
//! role.insert_after("train", "audit", tasklet(|c: &mut Ctx| {
//!     c.log.push(format!("round {}", c.round));
//!     Ok(())
//! })).expect("train exists");
//! let mut ctx = Ctx::default();
//! let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
//! rt.block_on(role.run(&mut ctx)).expect("runs");
//! // The loop exits as soon as its condition holds, right after the `train` step that made
//! // round 2: the rest of the body (the audit of round 2) is skipped.
//! assert_eq!(ctx.log, ["init", "round 1"]);
//! assert_eq!(ctx.round, 2);
//! ```
//!
//! Semantics: nodes run in order. A loop checks its condition before its first step and
//! after every step of its body, and exits as soon as it holds, so a step that ends the work
//! (a trainer receiving end-of-training) skips the rest of the body. Each tasklet's wall
//! time is handed to [`Context::record_time`].

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::{Error, Result};

/// The role state tasklets work on.
pub trait Context: Send {
    /// Called after each tasklet with its alias and wall time (no-op by default).
    fn record_time(&mut self, _alias: &str, _seconds: f64) {}
    /// The round the role is in, for the `tasklet` tracing span (none by default).
    fn round(&self) -> Option<u64> {
        None
    }
}

/// An async step of a role.
pub type TaskletFn<C> = Arc<dyn for<'a> Fn(&'a mut C) -> BoxFuture<'a, Result<()>> + Send + Sync>;

/// A loop condition.
pub type Cond<C> = Arc<dyn Fn(&C) -> bool + Send + Sync>;

/// A synchronous tasklet from a closure.
pub fn tasklet<C, F>(f: F) -> TaskletFn<C>
where
    C: Send + 'static,
    F: Fn(&mut C) -> Result<()> + Send + Sync + 'static,
{
    Arc::new(move |ctx: &mut C| {
        let res = f(ctx);
        Box::pin(async move { res })
    })
}

/// An async tasklet from a function `fn(&mut C) -> impl Future` that borrows the context,
/// written as `|ctx| Box::pin(step(ctx))`.
pub fn async_tasklet<C, F>(f: F) -> TaskletFn<C>
where
    F: for<'a> Fn(&'a mut C) -> BoxFuture<'a, Result<()>> + Send + Sync + 'static,
{
    Arc::new(f)
}

/// Boxes a future for [`async_tasklet`].
pub fn boxed<'a, F>(future: F) -> BoxFuture<'a, Result<()>>
where
    F: Future<Output = Result<()>> + Send + 'a,
{
    Box::pin(future)
}

/// One step of a role.
pub enum Node<C> {
    /// An async function of the context.
    Tasklet {
        /// Unique name.
        alias: String,
        /// The work.
        run: TaskletFn<C>,
    },
    /// Repeat `body` until `until` holds.
    Loop {
        /// Unique name.
        alias: String,
        /// Exit condition, checked before the first step and after every step.
        until: Cond<C>,
        /// The steps.
        body: Vec<Node<C>>,
    },
}

impl<C> Node<C> {
    /// The node's alias.
    pub fn alias(&self) -> &str {
        match self {
            Node::Tasklet { alias, .. } | Node::Loop { alias, .. } => alias,
        }
    }
}

impl<C> std::fmt::Debug for Node<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Tasklet { alias, .. } => write!(f, "{alias}"),
            Node::Loop { alias, body, .. } => write!(f, "loop {alias} {body:?}"),
        }
    }
}

/// A role program: nodes in order.
pub struct Composer<C> {
    nodes: Vec<Node<C>>,
}

impl<C> Default for Composer<C> {
    fn default() -> Self {
        Composer { nodes: Vec::new() }
    }
}

impl<C> std::fmt::Debug for Composer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.nodes).finish()
    }
}

/// Where a node sits: the path of indices through loop bodies.
fn find<C>(nodes: &[Node<C>], alias: &str) -> Option<Vec<usize>> {
    for (i, node) in nodes.iter().enumerate() {
        if node.alias() == alias {
            return Some(vec![i]);
        }
        if let Node::Loop { body, .. } = node
            && let Some(mut path) = find(body, alias)
        {
            path.insert(0, i);
            return Some(path);
        }
    }
    None
}

fn list_at<'a, C>(nodes: &'a mut Vec<Node<C>>, path: &[usize]) -> &'a mut Vec<Node<C>> {
    match path.split_first() {
        None => nodes,
        Some((&i, rest)) => match &mut nodes[i] {
            Node::Loop { body, .. } => list_at(body, rest),
            Node::Tasklet { .. } => unreachable!("paths from find() only go through loops"),
        },
    }
}

fn collect_aliases<C>(nodes: &[Node<C>], res: &mut Vec<String>) {
    for node in nodes {
        res.push(node.alias().to_owned());
        if let Node::Loop { body, .. } = node {
            collect_aliases(body, res);
        }
    }
}

impl<C: Context + 'static> Composer<C> {
    /// An empty program.
    pub fn new() -> Self {
        Composer { nodes: Vec::new() }
    }

    /// Appends a tasklet (builder style). Panics on a duplicate alias: role programs are
    /// written by developers, and a duplicate is a bug in the program text.
    pub fn tasklet(mut self, alias: &str, run: TaskletFn<C>) -> Self {
        self.push(Node::Tasklet { alias: alias.to_owned(), run });
        self
    }

    /// Appends a loop whose `body` repeats until `until` holds (builder style).
    pub fn loop_until(
        mut self,
        alias: &str,
        until: impl Fn(&C) -> bool + Send + Sync + 'static,
        body: Composer<C>,
    ) -> Self {
        self.push(Node::Loop { alias: alias.to_owned(), until: Arc::new(until), body: body.nodes });
        self
    }

    fn push(&mut self, node: Node<C>) {
        assert!(
            self.check_new(&node).is_ok(),
            "duplicate alias {:?} in role program",
            node.alias()
        );
        self.nodes.push(node);
    }

    fn check_new(&self, node: &Node<C>) -> Result<()> {
        let mut new = Vec::new();
        collect_aliases(std::slice::from_ref(node), &mut new);
        let existing = self.aliases();
        match new.iter().find(|a| existing.contains(a)) {
            Some(dup) => Err(Error::Config(format!("tasklet alias {dup:?} is already used"))),
            None => Ok(()),
        }
    }

    fn locate(&self, alias: &str) -> Result<Vec<usize>> {
        find(&self.nodes, alias).ok_or_else(|| {
            Error::Config(format!(
                "no tasklet or loop {alias:?} (have: {})",
                self.aliases().join(", ")
            ))
        })
    }

    /// Every alias, depth first.
    pub fn aliases(&self) -> Vec<String> {
        let mut res = Vec::new();
        collect_aliases(&self.nodes, &mut res);
        res
    }

    /// Inserts tasklet `new_alias` right before `alias`.
    pub fn insert_before(&mut self, alias: &str, new_alias: &str, run: TaskletFn<C>) -> Result<()> {
        self.insert_node(alias, 0, Node::Tasklet { alias: new_alias.to_owned(), run })
    }

    /// Inserts tasklet `new_alias` right after `alias`.
    pub fn insert_after(&mut self, alias: &str, new_alias: &str, run: TaskletFn<C>) -> Result<()> {
        self.insert_node(alias, 1, Node::Tasklet { alias: new_alias.to_owned(), run })
    }

    /// Inserts any node (e.g. a loop) before (`offset` 0) or after (`offset` 1) `alias`.
    pub fn insert_node(&mut self, alias: &str, offset: usize, node: Node<C>) -> Result<()> {
        self.check_new(&node)?;
        let mut path = self.locate(alias)?;
        let at = path.pop().expect("find returns a non-empty path") + offset.min(1);
        list_at(&mut self.nodes, &path).insert(at, node);
        Ok(())
    }

    /// Replaces the work of tasklet `alias`, keeping its alias and place.
    pub fn replace(&mut self, alias: &str, run: TaskletFn<C>) -> Result<()> {
        let mut path = self.locate(alias)?;
        let at = path.pop().expect("find returns a non-empty path");
        match &mut list_at(&mut self.nodes, &path)[at] {
            Node::Tasklet { run: old, .. } => {
                *old = run;
                Ok(())
            }
            Node::Loop { .. } => Err(Error::Config(format!(
                "{alias:?} is a loop, not a tasklet; remove it and insert a new node"
            ))),
        }
    }

    /// Decorates tasklet `alias`: its work becomes `decorate(its current work)`, keeping its
    /// alias and place. The decorator decides whether, when and how the original runs (skip
    /// it, retry it, map its error), so a role built from another never has to build the
    /// other's program twice to take a tasklet out of it.
    pub fn wrap(
        &mut self,
        alias: &str,
        decorate: impl FnOnce(TaskletFn<C>) -> TaskletFn<C>,
    ) -> Result<()> {
        let mut path = self.locate(alias)?;
        let at = path.pop().expect("find returns a non-empty path");
        match &mut list_at(&mut self.nodes, &path)[at] {
            Node::Tasklet { run, .. } => {
                *run = decorate(run.clone());
                Ok(())
            }
            Node::Loop { .. } => Err(Error::Config(format!(
                "{alias:?} is a loop, not a tasklet; only tasklets can be wrapped"
            ))),
        }
    }

    /// Removes node `alias` (a loop goes with its body) and returns it.
    pub fn remove(&mut self, alias: &str) -> Result<Node<C>> {
        let mut path = self.locate(alias)?;
        let at = path.pop().expect("find returns a non-empty path");
        Ok(list_at(&mut self.nodes, &path).remove(at))
    }

    /// Runs the program on `ctx`.
    pub async fn run(&self, ctx: &mut C) -> Result<()> {
        run_nodes(&self.nodes, ctx).await
    }
}

fn run_nodes<'a, C: Context + 'static>(
    nodes: &'a [Node<C>],
    ctx: &'a mut C,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        for node in nodes {
            match node {
                Node::Tasklet { alias, run } => {
                    let span = tracing::debug_span!("tasklet", %alias, round = ctx.round());
                    let start = Instant::now();
                    run(ctx).instrument(span).await?;
                    ctx.record_time(alias, start.elapsed().as_secs_f64());
                }
                Node::Loop { until, body, .. } => {
                    'outer: while !until(ctx) {
                        for step in body {
                            run_nodes(std::slice::from_ref(step), ctx).await?;
                            if until(ctx) {
                                break 'outer;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Ctx {
        trace: Vec<String>,
        n: u32,
        timed: Vec<String>,
    }

    impl Context for Ctx {
        fn record_time(&mut self, alias: &str, seconds: f64) {
            assert!(seconds >= 0.0);
            self.timed.push(alias.to_owned());
        }
    }

    fn step(name: &'static str) -> TaskletFn<Ctx> {
        tasklet(move |c: &mut Ctx| {
            c.trace.push(name.to_owned());
            Ok(())
        })
    }

    fn program() -> Composer<Ctx> {
        Composer::new().tasklet("a", step("a")).loop_until(
            "main",
            |c: &Ctx| c.n >= 2,
            Composer::new()
                .tasklet("b", step("b"))
                .tasklet(
                    "count",
                    tasklet(|c: &mut Ctx| {
                        c.n += 1;
                        Ok(())
                    }),
                )
                .tasklet("c", step("c")),
        )
    }

    async fn trace(p: &Composer<Ctx>) -> Vec<String> {
        let mut ctx = Ctx::default();
        p.run(&mut ctx).await.expect("runs");
        ctx.trace
    }

    #[tokio::test]
    async fn wrap_decorates_a_tasklet_in_place() {
        let mut p = program();
        // Inside a loop: "b" runs only on odd counts, and is marked when it does.
        p.wrap("b", |inner| {
            Arc::new(move |c: &mut Ctx| {
                let inner = inner.clone();
                Box::pin(async move {
                    if c.n % 2 == 1 {
                        return Ok(());
                    }
                    inner(c).await?;
                    c.trace.push("wrapped".to_owned());
                    Ok(())
                })
            })
        })
        .expect("b exists");
        assert_eq!(trace(&p).await, ["a", "b", "wrapped", "c"]);
        assert_eq!(p.aliases(), ["a", "main", "b", "count", "c"]);
        let err = p.wrap("nope", |t| t).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn runs_loops_and_exits_as_soon_as_the_condition_holds() {
        let p = program();
        // Round 2 ends right after "count": "c" is skipped.
        assert_eq!(trace(&p).await, ["a", "b", "c", "b"]);
        let mut ctx = Ctx::default();
        p.run(&mut ctx).await.expect("runs");
        assert_eq!(ctx.timed, ["a", "b", "count", "c", "b", "count"]);
        assert_eq!(p.aliases(), ["a", "main", "b", "count", "c"]);
    }

    #[tokio::test]
    async fn edits_by_alias_inside_loops() {
        let mut p = program();
        p.insert_before("b", "x", step("x")).expect("b exists");
        p.insert_after("c", "y", step("y")).expect("c exists");
        p.replace("a", step("A")).expect("a exists");
        assert!(matches!(p.remove("c").expect("c exists"), Node::Tasklet { .. }));
        assert_eq!(trace(&p).await, ["A", "x", "b", "y", "x", "b"]);
        p.remove("main").expect("loop removable");
        assert_eq!(trace(&p).await, ["A"]);
    }

    #[tokio::test]
    async fn bad_edits_name_the_alias_and_change_nothing() {
        let mut p = program();
        let err = p.insert_after("nope", "z", step("z")).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("have: a, main"), "{err}");
        let err = p.insert_after("a", "b", step("z")).unwrap_err().to_string();
        assert!(err.contains("already used"), "{err}");
        assert!(p.replace("main", step("z")).unwrap_err().to_string().contains("loop"));
        assert!(p.remove("zz").is_err());
        assert_eq!(p.aliases(), ["a", "main", "b", "count", "c"]);
    }

    #[tokio::test]
    async fn a_failing_tasklet_stops_the_program() {
        let mut p = program();
        p.insert_after("b", "boom", tasklet(|_: &mut Ctx| Err(Error::Config("boom".into()))))
            .expect("b exists");
        let mut ctx = Ctx::default();
        let err = p.run(&mut ctx).await.unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(ctx.trace, ["a", "b"]);
    }
}
