//! The apiserver: REST resources, authentication, the agent's task fetch, OpenAPI.
