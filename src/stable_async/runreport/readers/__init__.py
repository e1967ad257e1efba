"""One reader per log format; each returns `stable_async.runreport.runlog.RunLog` objects."""
