//! Kubernetes pod specs to runtime plans.
