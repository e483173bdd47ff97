"""blobchain.tasks"""
