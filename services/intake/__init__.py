"""intake: REST API and requests-topic consumer; validation, auth, compatibility; writes Pending."""
