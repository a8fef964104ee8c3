//! `create user|token`, `get users` (admin; a user may create their own tokens).

use fledge_types::UserId;

use super::Ctx;
use crate::output;

/// `create user ID [--admin]`: creates the user and prints a first token for them.
pub async fn create(ctx: &Ctx, id: &str, admin: bool) -> anyhow::Result<()> {
    let user = ctx.client.create_user(&UserId::new(id), admin).await?;
    let token = ctx.client.create_token(&user.id).await?;
    eprintln!(
        "created {} {}; their token follows (shown once)",
        if user.is_admin { "admin" } else { "user" },
        user.id
    );
    output::emit(&token)?;
    Ok(())
}

/// `create token USER`: prints a new token, shown once.
pub async fn token(ctx: &Ctx, user: &str) -> anyhow::Result<()> {
    let token = ctx.client.create_token(&UserId::new(user)).await?;
    eprintln!("new token for {user} follows (shown once)");
    output::emit(&token)?;
    Ok(())
}

/// `user` if given, else the caller.
async fn whose(ctx: &Ctx, user: Option<&str>) -> anyhow::Result<UserId> {
    Ok(match user {
        Some(user) => UserId::new(user),
        None => ctx.client.whoami().await?.id,
    })
}

/// `token create [--user U] [--description D] [--expires-in T]`: prints the token, shown once.
pub async fn create_token(
    ctx: &Ctx,
    user: Option<&str>,
    description: &str,
    expires_in: Option<u64>,
) -> anyhow::Result<()> {
    let user = whose(ctx, user).await?;
    let request =
        fledge_client::TokenRequest { description: description.to_owned(), ttl_secs: expires_in };
    let issued = ctx.client.issue_token(&user, &request).await?;
    let expiry = match issued.expires_at {
        Some(at) => format!("expires {}", at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => "never expires".to_owned(),
    };
    eprintln!("new token {} for {user} ({expiry}) follows (shown once)", issued.id);
    output::emit(&issued.token)?;
    Ok(())
}

/// `token list [--user U]`.
pub async fn list_tokens(ctx: &Ctx, user: Option<&str>) -> anyhow::Result<()> {
    let user = whose(ctx, user).await?;
    let tokens = ctx.client.list_tokens(&user).await?;
    ctx.resources(&tokens, |items, cols| output::tokens(items, cols.now))
}

/// `token revoke ID [--user U]`.
pub async fn revoke_token(ctx: &Ctx, user: Option<&str>, id: &str) -> anyhow::Result<()> {
    let user = whose(ctx, user).await?;
    ctx.client.revoke_token(&user, id).await?;
    eprintln!("revoked token {id} of {user}");
    Ok(())
}

/// `get users`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let users = ctx.client.list_users().await?;
    ctx.resources(&users, |items, _| output::users(items))
}
