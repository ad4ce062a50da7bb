"""The whole story as one resumable run (``stages``) and its report (``report``)."""
