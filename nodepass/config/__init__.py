"""Instance URLs, query parameters, tunables and Go durations: typed, frozen configs."""
