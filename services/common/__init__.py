"""Shared bootstrap for the four SMILY services: config, logging, errors, server, channels."""
