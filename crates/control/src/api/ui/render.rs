//! The dashboard's HTML and SVG, rendered from plain data: no I/O here, so every page can be
//! unit-tested as a string.
//!
//! Every string that comes from a user (names, ids, descriptions, URLs, log lines, metric
//! names) goes through [`escape`] on its way into the markup; numbers are formatted here. The
//! pages carry no inline script or style (the Content-Security-Policy forbids both): scripts
//! and styles are the static files, and SVG colours are classes or presentation attributes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use fledge_types::{
    Compute, Dataset, Design, Job, JobState, MetricRecord, Schema, Task, TaskState, User,
};

/// HTML-escapes `text` for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes `text` for a URL path segment or query value.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Which entry of the navigation bar a page belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    /// The jobs list and job pages.
    Jobs,
    /// Designs.
    Designs,
    /// Datasets.
    Datasets,
    /// Computes.
    Computes,
    /// The login page (no navigation).
    None,
}

/// A whole page: the layout around `body`.
pub fn page(title: &str, user: Option<&User>, nav: Nav, body: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Fledge</title>\
         <link rel=\"stylesheet\" href=\"/ui/static/ui.css\">\
         <script src=\"/ui/static/ui.js\" defer></script></head><body>",
        escape(title)
    );
    if let Some(user) = user {
        out.push_str("<header><nav><a class=\"brand\" href=\"/ui/jobs\">Fledge</a>");
        for (entry, href, label) in [
            (Nav::Jobs, "/ui/jobs", "Jobs"),
            (Nav::Designs, "/ui/designs", "Designs"),
            (Nav::Datasets, "/ui/datasets", "Datasets"),
            (Nav::Computes, "/ui/computes", "Computes"),
        ] {
            let class = if entry == nav { " class=\"active\"" } else { "" };
            let _ = write!(out, "<a href=\"{href}\"{class}>{label}</a>");
        }
        let _ = write!(
            out,
            "<span class=\"who\">{}{}</span>\
             <form method=\"post\" action=\"/ui/logout\"><button type=\"submit\">Log out</button></form>\
             </nav></header>",
            escape(user.id.as_str()),
            if user.is_admin { " (admin)" } else { "" }
        );
    }
    let _ = writeln!(out, "<main>{body}</main></body></html>");
    out
}

/// The login page: a form that posts the token, which the script also fills from the URL
/// fragment (`#token=...`, never sent to the server).
pub fn login(next: &str, error: Option<&str>) -> String {
    let mut body = String::from("<section class=\"login\"><h1>Fledge</h1>");
    if let Some(error) = error {
        let _ = write!(body, "<p class=\"error\" role=\"alert\">{}</p>", escape(error));
    }
    let _ = write!(
        body,
        "<form id=\"login\" method=\"post\" action=\"/ui/login\">\
         <label for=\"token\">API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required maxlength=\"256\">\
         <input id=\"next\" name=\"next\" type=\"hidden\" value=\"{}\">\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">A token from <code>fledgectl token create</code> or the one \
         <code>fledge standalone</code> printed.</p></section>",
        escape(next)
    );
    page("Log in", None, Nav::None, &body)
}

/// An error page (404, 403, ...) with its message.
pub fn error_page(user: Option<&User>, status: u16, message: &str) -> String {
    let body = format!(
        "<h1>{status}</h1><p class=\"error\">{}</p><p><a href=\"/ui/jobs\">Back to the jobs</a></p>",
        escape(message)
    );
    page(&format!("Error {status}"), user, Nav::None, &body)
}

/// `1.5 MB`, `512 B`: a byte count for people.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n.max(0.0);
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `42s`, `3m 5s`, `2h 4m`: an age or duration for people.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn job_state_badge(state: JobState) -> String {
    format!("<span class=\"badge job-{0}\">{0}</span>", state.as_str())
}

fn task_state_badge(state: TaskState) -> String {
    format!("<span class=\"badge state-{0}\">{0}</span>", state.as_str())
}

/// The rounds a job's spec asks for (`modelSpec.hyperparameters.rounds`), if it says.
pub fn planned_rounds(job: &Job) -> Option<u64> {
    job.spec.model_spec.hyperparameters.get("rounds").and_then(serde_json::Value::as_u64)
}

/// One line of the jobs list.
#[derive(Clone, Debug)]
pub struct JobRow {
    /// The job.
    pub job: Job,
    /// Its tasks by state.
    pub tasks: HashMap<TaskState, u64>,
    /// The highest round recorded so far.
    pub round: Option<u64>,
}

/// The jobs list's live part: a table of jobs, newest first, and whether any is still live.
pub fn jobs_fragment(rows: &[JobRow], total: usize, now: DateTime<Utc>) -> String {
    let live = rows.iter().any(|r| !r.job.state.is_final());
    let mut out = format!("<div class=\"fragment\" data-final=\"{}\">", !live);
    if rows.is_empty() {
        out.push_str(
            "<p class=\"empty\">No jobs yet. Submit one with <code>fledgectl run DIR</code>.</p>",
        );
        out.push_str("</div>");
        return out;
    }
    out.push_str(
        "<table id=\"jobs\" class=\"list\"><thead><tr><th>job</th><th>name</th><th>owner</th>\
         <th>state</th><th>progress</th><th>created</th><th>updated</th></tr></thead><tbody>",
    );
    for row in rows {
        let job = &row.job;
        let total_tasks: u64 = row.tasks.values().sum();
        let done: u64 = row.tasks.iter().filter(|(s, _)| s.is_final()).map(|(_, n)| n).sum();
        let mut progress = match (row.round, planned_rounds(job)) {
            (Some(r), Some(of)) => format!("round {r} of {of}"),
            (Some(r), None) => format!("round {r}"),
            (None, Some(of)) => format!("{of} rounds planned"),
            (None, None) => String::new(),
        };
        if total_tasks > 0 {
            if !progress.is_empty() {
                progress.push_str(", ");
            }
            let _ = write!(progress, "{done}/{total_tasks} tasks ended");
        }
        let _ = write!(
            out,
            "<tr class=\"job\" data-job=\"{id}\"><td><a href=\"/ui/jobs/{link}\"><code>{id}</code></a></td>\
             <td>{name}</td><td>{owner}</td><td>{state}</td><td>{progress}</td>\
             <td title=\"{created}\">{created_age} ago</td><td title=\"{updated}\">{updated_age} ago</td></tr>",
            id = escape(job.id.as_str()),
            link = url_encode(job.id.as_str()),
            name = escape(&job.spec.name),
            owner = escape(job.owner.as_str()),
            state = job_state_badge(job.state),
            progress = escape(&progress),
            created = time(&job.created_at),
            created_age = age((now - job.created_at).num_seconds()),
            updated = time(&job.updated_at),
            updated_age = age((now - job.updated_at).num_seconds()),
        );
    }
    out.push_str("</tbody></table>");
    if total > rows.len() {
        let _ = write!(out, "<p class=\"hint\">The newest {} of {total} jobs.</p>", rows.len());
    }
    out.push_str("</div>");
    out
}

/// The jobs page around its live fragment.
pub fn jobs_page(user: &User, fragment: &str) -> String {
    let body =
        format!("<h1>Jobs</h1><div id=\"live\" data-live=\"/ui/jobs/fragment\">{fragment}</div>");
    page("Jobs", Some(user), Nav::Jobs, &body)
}

/// One figure of the global model per round, and what it measures.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The metric's name as recorded (`global.loss`, ...).
    pub metric: String,
    /// What the figure measures, for the chart's title.
    pub label: String,
    /// `(round, value)`, rounds ascending, one point per round.
    pub points: Vec<(u64, f64)>,
}

/// Most rounds drawn in a chart or listed in the rounds table: the latest ones.
pub const MAX_ROUNDS_SHOWN: usize = 1_000;

/// The series of `figure` (`loss` or `accuracy`) of the global model, named for what it
/// measures: the top aggregator's `global.<figure>` (the aggregated model on the evaluation
/// set) when any record has it; else the aggregators' `trainer.afterTraining.<figure>` (their
/// trainers' locally trained models, sample-weighted mean); else the plain `<figure>` of the
/// ring, hybrid and vertical parties (the model they share). One point per round (the mean when
/// several tasks record it, e.g. middle aggregators), the latest [`MAX_ROUNDS_SHOWN`] rounds.
pub fn global_series(records: &[MetricRecord], figure: &str) -> Option<Series> {
    let candidates = [
        (format!("global.{figure}"), format!("{figure} of the global model on the evaluation set")),
        (
            format!("trainer.afterTraining.{figure}"),
            format!("{figure} of the trainers' local models, weighted mean (no evaluation set)"),
        ),
        (figure.to_owned(), format!("{figure} of the model the parties share")),
    ];
    for (metric, label) in candidates {
        let mut per_round: BTreeMap<u64, (f64, u32)> = BTreeMap::new();
        for record in records {
            if let Some(value) = record.metrics.get(&metric).filter(|v| v.is_finite()) {
                let entry = per_round.entry(record.round).or_insert((0.0, 0));
                entry.0 += value;
                entry.1 += 1;
            }
        }
        if per_round.is_empty() {
            continue;
        }
        let skip = per_round.len().saturating_sub(MAX_ROUNDS_SHOWN);
        let points =
            per_round.into_iter().skip(skip).map(|(r, (sum, n))| (r, sum / f64::from(n))).collect();
        return Some(Series { metric, label, points });
    }
    None
}

/// A line chart of `series` as inline SVG: one `circle.point` per round, each with its value as
/// a tooltip.
pub fn chart(id: &str, title: &str, series: Option<&Series>) -> String {
    const W: f64 = 560.0;
    const H: f64 = 220.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 12.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 34.0;
    let mut out = format!(
        "<figure class=\"chart\"><figcaption>{}</figcaption>",
        escape(&match series {
            Some(s) => format!("{title}: {} ({})", s.label, s.metric),
            None => title.to_owned(),
        })
    );
    let Some(series) = series.filter(|s| !s.points.is_empty()) else {
        let _ = write!(
            out,
            "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"no data yet\">\
             <text x=\"{x}\" y=\"{y}\" class=\"empty\" text-anchor=\"middle\">no rounds recorded yet</text></svg></figure>",
            id = escape(id),
            x = W / 2.0,
            y = H / 2.0
        );
        return out;
    };
    let (first, last) = (series.points[0].0, series.points[series.points.len() - 1].0);
    let (mut lo, mut hi) = series
        .points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    if (hi - lo).abs() < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let x = |round: u64| {
        if last == first {
            LEFT + (W - LEFT - RIGHT) / 2.0
        } else {
            LEFT + (round - first) as f64 / (last - first) as f64 * (W - LEFT - RIGHT)
        }
    };
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (H - TOP - BOTTOM);
    let _ = write!(
        out,
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{label}\" \
         data-points=\"{n}\">",
        id = escape(id),
        label = escape(&format!("{title} per round")),
        n = series.points.len()
    );
    // Axes with their bounds, and a few grid lines.
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>",
        b = H - BOTTOM,
        r = W - RIGHT
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{r}\" y2=\"{yy:.1}\"/>\
             <text class=\"tick\" x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{v}</text>",
            yy = y(v),
            r = W - RIGHT,
            tx = LEFT - 4.0,
            ty = y(v) + 4.0,
            v = figure(v)
        );
    }
    let _ = write!(
        out,
        "<text class=\"tick\" x=\"{LEFT}\" y=\"{yb}\" text-anchor=\"start\">round {first}</text>\
         <text class=\"tick\" x=\"{r}\" y=\"{yb}\" text-anchor=\"end\">round {last}</text>",
        yb = H - BOTTOM + 16.0,
        r = W - RIGHT
    );
    let polyline: Vec<String> =
        series.points.iter().map(|&(r, v)| format!("{:.1},{:.1}", x(r), y(v))).collect();
    let _ = write!(out, "<polyline class=\"line\" points=\"{}\"/>", polyline.join(" "));
    for &(round, value) in &series.points {
        let _ = write!(
            out,
            "<circle class=\"point\" data-round=\"{round}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\">\
             <title>round {round}: {}</title></circle>",
            x(round),
            y(value),
            figure(value)
        );
    }
    out.push_str("</svg></figure>");
    out
}

/// A figure with four significant decimals (or fewer for large values).
fn figure(v: f64) -> String {
    if v.abs() >= 1000.0 { format!("{v:.0}") } else { format!("{v:.4}") }
}

/// Per-round figures of the whole job: the longest `roundSeconds`, the bytes every task sent,
/// the data-consuming tasks that reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundRow {
    /// The round.
    pub round: u64,
    /// The longest `roundSeconds` any task recorded for it.
    pub seconds: Option<f64>,
    /// The sum of every task's `bytesSent` for it.
    pub bytes_sent: f64,
    /// How many data-consuming tasks recorded the round.
    pub participants: usize,
}

/// The latest [`MAX_ROUNDS_SHOWN`] rounds' [`RoundRow`]s, ascending.
pub fn rounds(records: &[MetricRecord], data_roles: &BTreeSet<String>) -> Vec<RoundRow> {
    let mut by_round: BTreeMap<u64, (RoundRow, BTreeSet<&str>)> = BTreeMap::new();
    for record in records {
        let (row, participants) = by_round.entry(record.round).or_insert_with(|| {
            (RoundRow { round: record.round, ..RoundRow::default() }, BTreeSet::new())
        });
        if let Some(s) = record.metrics.get("roundSeconds").filter(|v| v.is_finite()) {
            row.seconds = Some(row.seconds.map_or(*s, |m: f64| m.max(*s)));
        }
        if let Some(b) = record.metrics.get("bytesSent").filter(|v| v.is_finite()) {
            row.bytes_sent += b;
        }
        if data_roles.contains(&record.role) {
            participants.insert(record.task_id.as_str());
        }
    }
    let skip = by_round.len().saturating_sub(MAX_ROUNDS_SHOWN);
    by_round
        .into_values()
        .skip(skip)
        .map(|(mut row, participants)| {
            row.participants = participants.len();
            row
        })
        .collect()
}

fn rounds_table(rows: &[RoundRow]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">No rounds recorded yet.</p>".to_owned();
    }
    let total: f64 = rows.iter().map(|r| r.bytes_sent).sum();
    let mut out = format!(
        "<p>{} rounds, {} sent over all channels by all tasks.</p>\
         <div class=\"scroll\"><table id=\"rounds\" class=\"list\"><thead><tr><th>round</th>\
         <th>round time</th><th>bytes sent (all tasks)</th><th>participants</th></tr></thead><tbody>",
        rows.len(),
        bytes(total)
    );
    for row in rows.iter().rev() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            row.round,
            row.seconds.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "–".to_owned()),
            bytes(row.bytes_sent),
            row.participants
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// Most tasks drawn one by one in the topology graph; above it, roles are drawn with counts.
pub const MAX_GRAPH_TASKS: usize = 500;
/// Most edges drawn between tasks; above it, edges are drawn between roles.
const MAX_GRAPH_EDGES: usize = 2_000;
/// Tasks per row of a role before it wraps.
const PER_ROW: usize = 24;

/// The group label of a task: its groups on each channel, joined (`eu`, `default`).
fn group_of(task: &Task) -> String {
    let groups: BTreeSet<&str> = task.group_association.values().map(String::as_str).collect();
    groups.into_iter().collect::<Vec<_>>().join("+")
}

/// The job's topology as SVG: one row of boxes per role (schema order), one box per group of
/// the role, one `g.task` node per task coloured by its state, and a line for each pair of
/// tasks a channel connects (same group on that channel).
pub fn topology(schema: &Schema, tasks: &[Task]) -> String {
    const NODE: f64 = 26.0;
    const GAP: f64 = 8.0;
    const ROW_H: f64 = 96.0;
    const LEFT: f64 = 150.0;
    let mut roles: Vec<&str> = schema.roles.iter().map(|r| r.name.as_str()).collect();
    for task in tasks {
        if !roles.contains(&task.role.as_str()) {
            roles.push(&task.role);
        }
    }
    let too_many = tasks.len() > MAX_GRAPH_TASKS;
    // Layout: per role, its groups in order; per group, its tasks in expansion order.
    let mut pos: HashMap<&str, (f64, f64)> = HashMap::new();
    let mut svg_body = String::new();
    let mut y = 16.0;
    let mut width: f64 = 400.0;
    let mut role_y: HashMap<&str, f64> = HashMap::new();
    for role in &roles {
        let mine: Vec<&Task> = tasks.iter().filter(|t| t.role == **role).collect();
        let mut groups: BTreeMap<String, Vec<&Task>> = BTreeMap::new();
        for task in &mine {
            groups.entry(group_of(task)).or_default().push(task);
        }
        let _ = write!(
            svg_body,
            "<text class=\"role\" x=\"8\" y=\"{:.1}\">{}</text><text class=\"tick\" x=\"8\" y=\"{:.1}\">{} task{}</text>",
            y + 24.0,
            escape(role),
            y + 40.0,
            mine.len(),
            if mine.len() == 1 { "" } else { "s" }
        );
        role_y.insert(*role, y + 30.0);
        let mut x = LEFT;
        let mut row_bottom = y + ROW_H - 16.0;
        for (group, members) in &groups {
            let shown = if too_many { 0 } else { members.len() };
            let cols = shown.clamp(1, PER_ROW);
            let lines = shown.div_ceil(PER_ROW).max(1);
            let gw = cols as f64 * (NODE + GAP) + GAP;
            let gh = lines as f64 * (NODE + GAP) + GAP + 16.0;
            let _ = write!(
                svg_body,
                "<g class=\"group\" data-group=\"{g}\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{gw:.1}\" height=\"{gh:.1}\" rx=\"6\"/>\
                 <text class=\"tick\" x=\"{tx:.1}\" y=\"{ty:.1}\">{g}{count}</text></g>",
                g = escape(group),
                tx = x + 4.0,
                ty = y + 12.0,
                count =
                    if too_many { format!(" ({} tasks)", members.len()) } else { String::new() },
            );
            for (i, task) in members.iter().take(shown).enumerate() {
                let cx = x + GAP + (i % PER_ROW) as f64 * (NODE + GAP) + NODE / 2.0;
                let cy = y + 16.0 + GAP + (i / PER_ROW) as f64 * (NODE + GAP) + NODE / 2.0;
                pos.insert(task.task_id.as_str(), (cx, cy));
            }
            x += gw + 12.0;
            row_bottom = row_bottom.max(y + gh + 8.0);
        }
        width = width.max(x + 8.0);
        y = row_bottom.max(y + ROW_H - 16.0) + 16.0;
    }
    // Edges under the nodes: every pair of tasks a channel connects.
    let mut edges = String::new();
    let mut n_edges = 0usize;
    'channels: for channel in &schema.channels {
        let [a, b] = channel.pair.as_slice() else { continue };
        for ta in tasks.iter().filter(|t| &t.role == a) {
            for tb in tasks.iter().filter(|t| &t.role == b) {
                if ta.task_id == tb.task_id
                    || ta.group_association.get(&channel.name)
                        != tb.group_association.get(&channel.name)
                    || !ta.group_association.contains_key(&channel.name)
                {
                    continue;
                }
                if a == b && ta.task_id.as_str() > tb.task_id.as_str() {
                    continue;
                }
                let (Some(&(x1, y1)), Some(&(x2, y2))) =
                    (pos.get(ta.task_id.as_str()), pos.get(tb.task_id.as_str()))
                else {
                    continue;
                };
                n_edges += 1;
                if n_edges > MAX_GRAPH_EDGES {
                    break 'channels;
                }
                let _ = write!(
                    edges,
                    "<line class=\"edge\" data-channel=\"{}\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\"/>",
                    escape(&channel.name)
                );
            }
        }
    }
    if too_many || n_edges > MAX_GRAPH_EDGES {
        // Role-level edges instead: one per channel.
        edges.clear();
        for channel in &schema.channels {
            let [a, b] = channel.pair.as_slice() else { continue };
            if let (Some(&y1), Some(&y2)) = (role_y.get(a.as_str()), role_y.get(b.as_str())) {
                let _ = write!(
                    edges,
                    "<line class=\"edge\" data-channel=\"{}\" x1=\"{x:.1}\" y1=\"{y1:.1}\" x2=\"{x:.1}\" y2=\"{y2:.1}\"/>",
                    escape(&channel.name),
                    x = LEFT - 10.0
                );
            }
        }
    }
    let mut nodes = String::new();
    for task in tasks {
        let Some(&(cx, cy)) = pos.get(task.task_id.as_str()) else { continue };
        let _ = write!(
            nodes,
            "<g class=\"task state-{state}\" data-task=\"{id}\"><circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{r}\"/>\
             <text class=\"index\" x=\"{cx:.1}\" y=\"{ty:.1}\" text-anchor=\"middle\">{index}</text>\
             <title>{role} {index} ({id}): {state}, on {compute}</title></g>",
            state = task.state.as_str(),
            id = escape(task.task_id.as_str()),
            r = NODE / 2.0 - 1.0,
            ty = cy + 4.0,
            index = task.index,
            role = escape(&task.role),
            compute = escape(task.compute_id.as_str()),
        );
    }
    let channels: Vec<String> = schema
        .channels
        .iter()
        .map(|c| format!("{} ({})", escape(&c.name), escape(&c.pair.join(" ↔ "))))
        .collect();
    let mut legend = String::from("<p class=\"legend\">");
    for state in TaskState::ALL {
        let _ = write!(legend, "<span class=\"key state-{0}\">{0}</span> ", state.as_str());
    }
    if !channels.is_empty() {
        let _ = write!(legend, "· channels: {}", channels.join(", "));
    }
    legend.push_str("</p>");
    let summary = if too_many {
        format!(
            "<p class=\"hint\">{} tasks: more than {MAX_GRAPH_TASKS}, so groups are drawn with their counts.</p>",
            tasks.len()
        )
    } else {
        String::new()
    };
    format!(
        "<svg id=\"topology\" class=\"topology\" viewBox=\"0 0 {width:.0} {y:.0}\" width=\"{width:.0}\" \
         role=\"img\" aria-label=\"topology: roles, groups and tasks\" data-tasks=\"{n}\">{svg_body}{edges}{nodes}</svg>{legend}{summary}",
        n = tasks.len()
    )
}

/// Longest log tail shown per task in the tasks table, in bytes (the store keeps 64 KiB).
pub const LOG_TAIL_SHOWN: usize = 4 * 1024;

fn log_tail(log: &str) -> &str {
    if log.len() <= LOG_TAIL_SHOWN {
        return log;
    }
    let mut start = log.len() - LOG_TAIL_SHOWN;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

fn tasks_table(tasks: &[Task], now: DateTime<Utc>) -> String {
    let mut out = String::from(
        "<div class=\"scroll\"><table id=\"tasks\" class=\"list\"><thead><tr><th>task</th><th>role</th>\
         <th>group</th><th>compute</th><th>state</th><th>restarts</th><th>heartbeat</th>\
         <th>log tail</th></tr></thead><tbody>",
    );
    for task in tasks {
        let heartbeat = match task.last_heartbeat {
            Some(t) => format!("{} ago", age((now - t).num_seconds())),
            None => "never".to_owned(),
        };
        let log = log_tail(&task.log);
        let log = if log.is_empty() {
            "–".to_owned()
        } else {
            format!(
                "<details><summary>{} lines</summary><pre>{}</pre></details>",
                log.lines().count(),
                escape(log)
            )
        };
        let _ = write!(
            out,
            "<tr class=\"task\" data-task=\"{id}\"><td><code>{id}</code></td><td>{role} {index}</td><td>{group}</td>\
             <td>{compute}{managed}</td><td>{state}</td><td>{restarts}</td><td>{heartbeat}</td><td>{log}</td></tr>",
            id = escape(task.task_id.as_str()),
            role = escape(&task.role),
            index = task.index,
            group = escape(&group_of(task)),
            compute = escape(task.compute_id.as_str()),
            managed = if task.managed { "" } else { " (participant-run)" },
            state = task_state_badge(task.state),
            restarts = task.restarts,
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// Everything the job page shows.
#[derive(Clone, Debug)]
pub struct JobView<'a> {
    /// The job.
    pub job: &'a Job,
    /// The schema revision it was expanded from.
    pub schema: &'a Schema,
    /// Its tasks.
    pub tasks: &'a [Task],
    /// Its metric records.
    pub records: &'a [MetricRecord],
    /// Its model files as `(label, query string)`, when the platform's registry keeps them;
    /// `Err` says why they are not listed.
    pub models: Result<Vec<(String, String)>, String>,
}

/// The job page's live part: state, charts, topology, rounds, tasks.
pub fn job_fragment(view: &JobView<'_>, now: DateTime<Utc>) -> String {
    let job = view.job;
    let data_roles: BTreeSet<String> =
        view.schema.roles.iter().filter(|r| r.is_data_consumer).map(|r| r.name.clone()).collect();
    let mut out = format!(
        "<div class=\"fragment\" data-final=\"{}\"><p class=\"status\">{}",
        job.state.is_final(),
        job_state_badge(job.state)
    );
    let latest = view.records.iter().map(|r| r.round).max();
    match (latest, planned_rounds(job)) {
        (Some(r), Some(of)) => {
            let _ = write!(out, " round {r} of {of}");
        }
        (Some(r), None) => {
            let _ = write!(out, " round {r}");
        }
        _ => {}
    }
    if let Some(reason) = &job.reason {
        let _ = write!(out, " — {}", escape(reason));
    }
    let since = job.started_at.unwrap_or(job.created_at);
    let until = job.ended_at.unwrap_or(now);
    let _ = write!(out, " · {} of wall time</p>", age((until - since).num_seconds()));
    let loss = global_series(view.records, "loss");
    let accuracy = global_series(view.records, "accuracy");
    let _ = write!(
        out,
        "<section class=\"charts\">{}{}</section>",
        chart("chart-loss", "Loss per round", loss.as_ref()),
        chart("chart-accuracy", "Accuracy per round", accuracy.as_ref())
    );
    let _ = write!(out, "<h2>Topology</h2>{}", topology(view.schema, view.tasks));
    let _ = write!(out, "<h2>Rounds</h2>{}", rounds_table(&rounds(view.records, &data_roles)));
    let _ = write!(out, "<h2>Tasks</h2>{}", tasks_table(view.tasks, now));
    out.push_str("</div>");
    out
}

/// The job page around its live fragment, with the downloads.
pub fn job_page(user: &User, view: &JobView<'_>, fragment: &str) -> String {
    let job = view.job;
    let id = url_encode(job.id.as_str());
    let mut downloads = format!(
        "<ul class=\"downloads\"><li><a href=\"/ui/jobs/{id}/metrics.json\" download>metric records (JSON, {} records)</a></li>",
        view.records.len()
    );
    match &view.models {
        Ok(models) if models.is_empty() => downloads.push_str("<li>no model saved yet</li>"),
        Ok(models) => {
            for (label, query) in models {
                let _ = write!(
                    downloads,
                    "<li><a href=\"/ui/jobs/{id}/model{}\" download>{}</a></li>",
                    escape(query),
                    escape(label)
                );
            }
        }
        Err(why) => {
            let _ = write!(downloads, "<li>models: {}</li>", escape(why));
        }
    }
    downloads.push_str("</ul>");
    let body = format!(
        "<h1>{name} <code>{jid}</code></h1>\
         <p class=\"meta\">owner {owner} · design {design} (schema {schema}, code {code}) · created {created}</p>\
         <div id=\"live\" data-live=\"/ui/jobs/{id}/fragment\">{fragment}</div>\
         <h2>Downloads</h2>{downloads}",
        name = escape(&job.spec.name),
        jid = escape(job.id.as_str()),
        owner = escape(job.owner.as_str()),
        design = escape(job.spec.design_id.as_str()),
        schema = escape(&job.schema_version),
        code = escape(&job.code_version),
        created = time(&job.created_at),
    );
    page(&format!("Job {}", job.spec.name), Some(user), Nav::Jobs, &body)
}

/// The designs page.
pub fn designs_page(user: &User, designs: &[Design]) -> String {
    let mut body = String::from("<h1>Designs</h1>");
    if designs.is_empty() {
        body.push_str("<p class=\"empty\">No designs yet.</p>");
    } else {
        body.push_str(
            "<table id=\"designs\" class=\"list\"><thead><tr><th>design</th><th>name</th><th>owner</th>\
             <th>description</th><th>schema revisions</th><th>code revisions</th><th>created</th></tr></thead><tbody>",
        );
        for d in designs {
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(d.id.as_str()),
                escape(&d.name),
                escape(d.owner.as_str()),
                escape(&d.description),
                d.schema_versions.len(),
                d.code_versions.len(),
                time(&d.created_at)
            );
        }
        body.push_str("</tbody></table>");
    }
    page("Designs", Some(user), Nav::Designs, &body)
}

/// The datasets page.
pub fn datasets_page(user: &User, datasets: &[Dataset]) -> String {
    let mut body = String::from("<h1>Datasets</h1>");
    if datasets.is_empty() {
        body.push_str("<p class=\"empty\">No datasets yet.</p>");
    } else {
        body.push_str(
            "<table id=\"datasets\" class=\"list\"><thead><tr><th>dataset</th><th>name</th><th>owner</th>\
             <th>realm</th><th>format</th><th>public</th><th>URL</th></tr></thead><tbody>",
        );
        for d in datasets {
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(d.id.as_str()),
                escape(&d.spec.name),
                escape(d.owner.as_str()),
                escape(&d.spec.realm),
                escape(&d.spec.data_format),
                if d.spec.is_public { "yes" } else { "no" },
                escape(&d.spec.url)
            );
        }
        body.push_str("</tbody></table>");
    }
    page("Datasets", Some(user), Nav::Datasets, &body)
}

/// What the computes page shows of one compute.
#[derive(Clone, Debug)]
pub struct ComputeRow {
    /// The compute, with `connected` filled in.
    pub compute: Compute,
    /// Its tasks of jobs that have not ended, running now.
    pub live_tasks: u64,
    /// The newest heartbeat of any of its tasks.
    pub last_heartbeat: Option<DateTime<Utc>>,
}

/// The computes page (admins only, as the API's `/computes`).
pub fn computes_page(
    user: &User,
    computes: Result<&[ComputeRow], &str>,
    now: DateTime<Utc>,
) -> String {
    let mut body = String::from("<h1>Computes</h1>");
    match computes {
        Err(why) => {
            let _ = write!(body, "<p class=\"error\">{}</p>", escape(why));
        }
        Ok([]) => body.push_str("<p class=\"empty\">No computes registered.</p>"),
        Ok(rows) => {
            body.push_str(
                "<table id=\"computes\" class=\"list\"><thead><tr><th>compute</th><th>region</th>\
                 <th>platform</th><th>deployer</th><th>running tasks</th><th>newest task heartbeat</th></tr></thead><tbody>",
            );
            for row in rows {
                let c = &row.compute;
                let platform = serde_json::to_value(c.platform)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let _ = write!(
                    body,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(c.compute_id.as_str()),
                    escape(&c.region),
                    escape(&platform),
                    if c.connected {
                        "<span class=\"badge state-running\">connected</span>"
                    } else {
                        "<span class=\"badge state-failed\">not connected</span>"
                    },
                    row.live_tasks,
                    row.last_heartbeat
                        .map(|t| format!("{} ago", age((now - t).num_seconds())))
                        .unwrap_or_else(|| "–".to_owned())
                );
            }
            body.push_str("</tbody></table>");
        }
    }
    page("Computes", Some(user), Nav::Computes, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_types::{ChannelSpec, GroupBy, JobSpec, Role, UserId};

    fn job(name: &str, state: JobState) -> Job {
        let now = Utc::now();
        let mut spec: JobSpec =
            serde_json::from_value(serde_json::json!({"designId": "d"})).unwrap();
        spec.name = name.to_owned();
        spec.model_spec.hyperparameters.insert("rounds".to_owned(), 3.into());
        Job {
            id: "job-1".into(),
            owner: UserId::new("ann"),
            spec,
            schema_version: "1".to_owned(),
            code_version: "1".to_owned(),
            state,
            reason: None,
            created_at: now,
            started_at: Some(now),
            updated_at: now,
            ended_at: None,
        }
    }

    fn record(task: &str, role: &str, round: u64, metrics: &[(&str, f64)]) -> MetricRecord {
        MetricRecord {
            task_id: task.into(),
            role: role.to_owned(),
            round,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            timestamp: None,
        }
    }

    fn task(id: &str, role: &str, index: u32, group: &str, state: TaskState) -> Task {
        Task {
            job_id: "job-1".into(),
            task_id: id.into(),
            role: role.to_owned(),
            index,
            group_association: BTreeMap::from([("param".to_owned(), group.to_owned())]),
            dataset_id: None,
            compute_id: "default".into(),
            managed: true,
            state,
            log: String::new(),
            updated_at: None,
            last_heartbeat: None,
            restarts: 0,
        }
    }

    fn schema() -> Schema {
        Schema {
            name: "s".to_owned(),
            description: String::new(),
            roles: vec![
                Role { name: "trainer".to_owned(), is_data_consumer: true, ..Role::default() },
                Role { name: "aggregator".to_owned(), ..Role::default() },
            ],
            channels: vec![ChannelSpec {
                name: "param".to_owned(),
                pair: vec!["trainer".to_owned(), "aggregator".to_owned()],
                group_by: Some(GroupBy {
                    kind: "tag".to_owned(),
                    value: vec!["eu".to_owned(), "us".to_owned()],
                }),
                ..ChannelSpec::default()
            }],
        }
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    #[test]
    fn every_special_character_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(url_encode("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn a_job_named_script_is_escaped_everywhere_it_is_shown() {
        let evil = "<script>alert(1)</script>";
        let mut j = job(evil, JobState::Running);
        j.reason = Some("<img src=x onerror=alert(2)>".to_owned());
        let rows = [JobRow { job: j.clone(), tasks: HashMap::new(), round: Some(1) }];
        let user = User { id: UserId::new("<b>ann</b>"), is_admin: false };
        let list = jobs_page(&user, &jobs_fragment(&rows, 1, Utc::now()));
        let mut evil_task = task("<t>", "<role>", 0, "<g>", TaskState::Running);
        evil_task.log = "line </pre><script>x()</script>".to_owned();
        let tasks = [evil_task];
        let records = [record("<t>", "<role>", 1, &[("global.loss", 0.5)])];
        let view = JobView {
            job: &j,
            schema: &Schema::default(),
            tasks: &tasks,
            records: &records,
            models: Ok(vec![("<final>".to_owned(), "?group=%3Cg%3E".to_owned())]),
        };
        let page = job_page(&user, &view, &job_fragment(&view, Utc::now()));
        for html in [&list, &page] {
            assert!(!html.contains("<script>"), "{html}");
            assert!(!html.contains("<img"), "{html}");
            assert!(!html.contains("<b>"), "{html}");
            assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{html}");
            // The only script is the static file.
            assert_eq!(count(html, "<script"), 1, "{html}");
            assert!(html.contains("<script src=\"/ui/static/ui.js\" defer></script>"));
            assert!(!html.contains(" style="), "no inline style: {html}");
        }
        assert!(page.contains("&lt;t&gt;") && !page.contains("<t>") && !page.contains("<role>"));
    }

    #[test]
    fn the_loss_chart_has_one_point_per_round_of_the_global_model() {
        let records = [
            record("a", "aggregator", 1, &[("global.loss", 2.0), ("global.accuracy", 0.5)]),
            record("t1", "trainer", 1, &[("afterTraining.loss", 9.0)]),
            record("a", "aggregator", 2, &[("global.loss", 1.0), ("global.accuracy", 0.7)]),
            record("a", "aggregator", 3, &[("global.loss", 0.5), ("global.accuracy", 0.9)]),
        ];
        let loss = global_series(&records, "loss").unwrap();
        assert_eq!(loss.metric, "global.loss");
        assert_eq!(loss.points, [(1, 2.0), (2, 1.0), (3, 0.5)]);
        let svg = chart("chart-loss", "Loss per round", Some(&loss));
        assert_eq!(count(&svg, "<circle class=\"point\""), 3);
        assert!(svg.contains("data-points=\"3\""));
        assert!(svg.contains("global model on the evaluation set (global.loss)"));
        for round in 1..=3 {
            assert!(svg.contains(&format!("data-round=\"{round}\"")));
        }
        // The lowest loss is drawn lowest (largest y).
        let cy = |round: u64| -> f64 {
            let at = svg.find(&format!("data-round=\"{round}\" cx=\"")).unwrap();
            let rest = &svg[at..];
            let cy = rest.find("cy=\"").unwrap() + 4;
            rest[cy..cy + rest[cy..].find('"').unwrap()].parse().unwrap()
        };
        assert!(cy(3) > cy(2) && cy(2) > cy(1));
        // Without an evaluation set: the aggregator's mean of its trainers' local models.
        let trainers = [record("a", "aggregator", 1, &[("trainer.afterTraining.loss", 0.3)])];
        let series = global_series(&trainers, "loss").unwrap();
        assert_eq!(series.metric, "trainer.afterTraining.loss");
        assert!(series.label.contains("trainers' local models"));
        assert_eq!(
            global_series(&[record("t", "trainer", 1, &[("train_loss", 1.0)])], "loss"),
            None
        );
        let empty = chart("chart-loss", "Loss per round", None);
        assert_eq!(count(&empty, "class=\"point\""), 0);
        assert!(empty.contains("no rounds recorded yet"));
    }

    #[test]
    fn a_round_recorded_by_several_aggregators_is_one_point() {
        let records = [
            record("m1", "middle", 1, &[("trainer.afterTraining.accuracy", 0.6)]),
            record("m2", "middle", 1, &[("trainer.afterTraining.accuracy", 0.8)]),
            record("m1", "middle", 2, &[("trainer.afterTraining.accuracy", f64::NAN)]),
        ];
        let series = global_series(&records, "accuracy").unwrap();
        assert_eq!(series.points.len(), 1);
        assert!((series.points[0].1 - 0.7).abs() < 1e-12);
    }

    #[test]
    fn the_topology_has_one_node_per_task_grouped_with_channel_edges() {
        let tasks = [
            task("t0", "trainer", 0, "eu", TaskState::Running),
            task("t1", "trainer", 1, "eu", TaskState::Completed),
            task("t2", "trainer", 2, "us", TaskState::Failed),
            task("a0", "aggregator", 0, "eu", TaskState::Running),
            task("a1", "aggregator", 1, "us", TaskState::Ready),
        ];
        let svg = topology(&schema(), &tasks);
        assert_eq!(count(&svg, "<g class=\"task "), 5);
        for t in &tasks {
            assert!(svg.contains(&format!(
                "<g class=\"task state-{}\" data-task=\"{}\"",
                t.state.as_str(),
                t.task_id
            )));
        }
        // Groups: eu and us of each role.
        assert_eq!(count(&svg, "<g class=\"group\""), 4);
        // Edges join a trainer to the aggregator of its group only: t0-a0, t1-a0, t2-a1.
        assert_eq!(count(&svg, "<line class=\"edge\""), 3);
        assert!(svg.contains("data-tasks=\"5\""));
    }

    #[test]
    fn a_huge_job_is_drawn_by_group_not_task() {
        let tasks: Vec<Task> = (0..=MAX_GRAPH_TASKS as u32)
            .map(|i| task(&format!("t{i}"), "trainer", i, "eu", TaskState::Running))
            .collect();
        let svg = topology(&schema(), &tasks);
        assert_eq!(count(&svg, "<g class=\"task "), 0);
        assert!(svg.contains(&format!("({} tasks)", MAX_GRAPH_TASKS + 1)));
    }

    #[test]
    fn rounds_count_time_bytes_and_participants() {
        let data: BTreeSet<String> = ["trainer".to_owned()].into();
        let records = [
            record("t1", "trainer", 1, &[("roundSeconds", 1.0), ("bytesSent", 100.0)]),
            record("t2", "trainer", 1, &[("roundSeconds", 3.0), ("bytesSent", 50.0)]),
            record("a", "aggregator", 1, &[("roundSeconds", 2.0), ("bytesSent", 400.0)]),
            record("t1", "trainer", 2, &[("bytesSent", 10.0)]),
        ];
        let rows = rounds(&records, &data);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            RoundRow { round: 1, seconds: Some(3.0), bytes_sent: 550.0, participants: 2 }
        );
        assert_eq!(
            rows[1],
            RoundRow { round: 2, seconds: None, bytes_sent: 10.0, participants: 1 }
        );
    }

    #[test]
    fn the_fragment_says_whether_the_job_is_final() {
        let records = [record("a", "aggregator", 2, &[("global.loss", 1.0)])];
        for (state, last) in [(JobState::Running, false), (JobState::Completed, true)] {
            let j = job("n", state);
            let view = JobView {
                job: &j,
                schema: &schema(),
                tasks: &[],
                records: &records,
                models: Ok(vec![]),
            };
            let html = job_fragment(&view, Utc::now());
            assert!(
                html.starts_with(&format!("<div class=\"fragment\" data-final=\"{last}\">")),
                "{html}"
            );
            assert!(html.contains("round 2 of 3"), "{html}");
        }
    }

    #[test]
    fn figures_for_people() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1_500_000.0), "1.5 MB");
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m 5s");
        assert_eq!(age(7300), "2h 1m");
        assert_eq!(age(-3), "0s");
    }
}
