"""billing_svc: exact, durable usage metering, one record per request, never counted twice."""
