//! One module per `fledge` subcommand.

pub mod bench;
pub mod chaos;
pub mod doctor;
pub mod fledgelet;
pub mod image;
pub mod privacy_bench;
pub mod quickstart;
pub mod roles;
pub mod run_task;
pub mod serve;
pub mod standalone;
pub mod tls;

/// Ends the process with this exit code and no further message (the command has said why).
#[derive(Debug, thiserror::Error)]
#[error("exit code {0}")]
pub struct Exit(pub u8);

/// An error in the user's arguments or configuration: exits with code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Initialises logging from `FLEDGE_LOG` (filter) and `FLEDGE_LOG_FORMAT` (`plain` or `json`),
/// and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
/// exports the same spans over OTLP/HTTP (protobuf) as service `OTEL_SERVICE_NAME` (default
/// `fledge-<subcommand>`). Keep the returned guard until exit: dropping it flushes the spans
/// still queued.
///
/// Without `FLEDGE_LOG`, `default_filter` applies. The embedded broker (rumqttd) logs every
/// ordinary disconnect as an error, so it is silenced unless `FLEDGE_LOG` asks for it.
pub fn init_tracing(default_filter: &str, service: &str) -> TracingGuard {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter =
        EnvFilter::try_from_env("FLEDGE_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLEDGE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    let (otel, provider, problem) = match otlp_provider(service) {
        Ok(Some(provider)) => {
            use opentelemetry::trace::TracerProvider as _;
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("fledge"));
            (Some(layer), Some(provider), None)
        }
        Ok(None) => (None, None, None),
        Err(err) => (None, None, Some(err)),
    };
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    if let Some(err) = problem {
        tracing::warn!(error = %err, "OTLP trace export is off: cannot build the exporter");
    }
    TracingGuard { provider }
}

/// Flushes and stops the OTLP exporter (if any) when dropped.
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("warning: OTLP spans not all exported: {err}");
        }
    }
}

/// The tracer provider of the OTLP exporter, when the standard `OTEL_EXPORTER_OTLP_*ENDPOINT`
/// variables ask for one (the exporter reads them itself, with `OTEL_EXPORTER_OTLP_HEADERS`
/// and `..._TIMEOUT`).
fn otlp_provider(
    service: &str,
) -> Result<
    Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    opentelemetry_otlp::ExporterBuildError,
> {
    use opentelemetry_otlp::WithExportConfig as _;
    let set = |name| std::env::var(name).is_ok_and(|v: String| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    fledge_tls::install_default_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| format!("fledge-{service}"));
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    Ok(Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}
