//! The one list of built-in operator kinds.

use std::sync::Arc;

use weir_engine::Registry;

/// A registry holding every built-in operator kind.
pub fn builtin() -> Registry {
    let mut registry = Registry::new();
    registry.register(Arc::new(crate::sources::generator::GeneratorFactory));
    registry.register(Arc::new(crate::sources::file::FileSourceFactory));
    #[cfg(feature = "mqtt")]
    registry.register(Arc::new(crate::sources::mqtt::MqttSourceFactory));
    registry.register(Arc::new(crate::transforms::sql::SqlFactory));
    registry.register(Arc::new(crate::transforms::anomaly::AnomalyFactory));
    registry.register(Arc::new(crate::sinks::stdout::StdoutFactory));
    registry.register(Arc::new(crate::sinks::file::FileSinkFactory));
    #[cfg(feature = "mqtt")]
    registry.register(Arc::new(crate::sinks::mqtt::MqttSinkFactory));
    registry.register(Arc::new(crate::sinks::blackhole::BlackholeFactory));
    #[cfg(not(feature = "mqtt"))]
    {
        registry.leave_out(weir_engine::Role::Source, "mqtt", "mqtt");
        registry.leave_out(weir_engine::Role::Sink, "mqtt", "mqtt");
    }
    registry
}
