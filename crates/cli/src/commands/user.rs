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

/// `get users`.
pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let users = ctx.client.list_users().await?;
    ctx.show(&users, || output::users(&users))
}
