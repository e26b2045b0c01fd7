"""Read side: query handlers. Each module is one view: its tables, projection and queries."""
