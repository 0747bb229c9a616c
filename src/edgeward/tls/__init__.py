"""TLS termination: certificates chosen by SNI (files and ACME), and the ACME client."""
