//! `fledge roles`: the built-in roles, from the SDK's role table (`fledge_sdk::table`).
//!
//! ```text
//! fledge roles            # a table: name, position, user code, aliases, what it does
//! fledge roles -o json    # [{"name", "aliases", "position", "app", "about"}, ...]
//! ```
//!
//! Every name (and alias) is what `fledge run-task --role-kind`, `builtin = "…"` in a
//! `fledge-role.toml` and Python's `fledge.run(..., role=…)` accept; Python's
//! `fledge.builtin_roles()` returns the same names.

use serde_json::{Value, json};

use fledge_sdk::table::{self, RoleEntry};

/// How to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON array.
    Json,
}

/// Arguments of `fledge roles`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// One row as JSON.
pub fn row_json(row: &RoleEntry) -> Value {
    json!({
        "name": row.name(),
        "aliases": row.aliases,
        "position": row.position.name(),
        "app": row.app.name(),
        "about": row.about,
    })
}

/// The table as text.
pub fn render(output: Output) -> String {
    match output {
        Output::Json => {
            let rows: Vec<Value> = table::ROLES.iter().map(row_json).collect();
            let mut text = serde_json::to_string_pretty(&rows).expect("JSON values serialise");
            text.push('\n');
            text
        }
        Output::Table => {
            let aliases = |r: &table::RoleEntry| -> String {
                if r.aliases.is_empty() { "-".to_owned() } else { r.aliases.join(",") }
            };
            // Every column as wide as its widest cell, so the rows line up.
            let width = table::ROLES.iter().map(|r| r.name().len()).max().unwrap_or(0).max(4);
            let alias_width =
                table::ROLES.iter().map(|r| aliases(r).len()).max().unwrap_or(0).max(7);
            let mut text = format!(
                "{:<width$}  {:<11}  {:<13}  {:<alias_width$}  ABOUT\n",
                "NAME", "POSITION", "USER CODE", "ALIASES"
            );
            for r in table::ROLES {
                text.push_str(&format!(
                    "{:<width$}  {:<11}  {:<13}  {:<alias_width$}  {}\n",
                    r.name(),
                    r.position.name(),
                    r.app.name(),
                    aliases(r),
                    r.about
                ));
            }
            text
        }
    }
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    print!("{}", render(args.output));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let text = render(Output::Table);
        let about = text.lines().next().expect("header").find("ABOUT").expect("ABOUT column");
        for (line, row) in text.lines().skip(1).zip(table::ROLES) {
            assert_eq!(line.find(row.about), Some(about), "{line}");
        }
    }

    #[test]
    fn json_lists_every_role_of_the_table() {
        let rows: Vec<Value> = serde_json::from_str(&render(Output::Json)).expect("json");
        let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(names, table::names());
        assert!(names.contains(&"ring-trainer") && names.contains(&"vertical-label-party"));
        let text = render(Output::Table);
        for name in table::names() {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
