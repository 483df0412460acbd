//! Tenants' namespaces for driver ids.
//!
//! Every API key belongs to a tenant (a fleet), and driver ids live in their tenant's namespace:
//! inside the service a driver is `tenant/driver`. A driver id can never contain `/` (see
//! [`super::position::is_valid_driver_id`]), so the split is unambiguous, and every store, the
//! log and history keep tenants apart with no schema of their own. Without keys (open mode) the
//! tenant is empty and ids are stored as given. Answers always show the id without the tenant.

use super::DriverId;

/// The id a tenant's driver has inside the service.
pub fn internal(tenant: &str, driver_id: &str) -> DriverId {
    if tenant.is_empty() {
        return DriverId::from(driver_id);
    }
    let mut id = DriverId::with_capacity(tenant.len() + 1 + driver_id.len());
    id.push_str(tenant);
    id.push('/');
    id.push_str(driver_id);
    id
}

/// The id as the tenant knows it.
pub fn external(id: &str) -> &str {
    id.split_once('/').map_or(id, |(_, driver)| driver)
}

/// The prefix every internal id of `tenant` starts with (`None` for open mode: everything).
pub fn prefix(tenant: &str) -> Option<String> {
    (!tenant.is_empty()).then(|| format!("{tenant}/"))
}

/// True when `id` belongs to the tenant whose prefix is given (always, without one).
pub fn belongs(id: &str, prefix: Option<&str>) -> bool {
    prefix.is_none_or(|p| id.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_open_mode_is_identity() {
        assert_eq!(internal("acme", "d1"), "acme/d1");
        assert_eq!(external("acme/d1"), "d1");
        assert_eq!(internal("", "d1"), "d1");
        assert_eq!(external("d1"), "d1");
        assert!(belongs("acme/d1", prefix("acme").as_deref()));
        assert!(!belongs("acme2/d1", prefix("acme").as_deref()));
        assert!(!belongs("d1", prefix("acme").as_deref()));
        assert!(belongs("anything", None));
    }
}
