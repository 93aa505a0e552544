"""common.io: results, reports and checkpoint export."""
