"""The daily production loop's state: a home's day records, CURRENT, the published log and its lock."""
